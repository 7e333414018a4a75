"""Command-line front ends: the seed's kachery-* commands and the `kacheryfs` tool."""
