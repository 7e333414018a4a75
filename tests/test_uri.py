"""Hash URLs: parsing, formatting, and every malformed input as InvalidURL."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kacheryfs.errors import InvalidInput, InvalidURL
from kacheryfs.uri import KacheryURL, check_label, format_url, parse_url

H1 = "ad7fb868e59c495f355d83f61da1c32cc21571cf"
HD = "4d329a296cfe0b3142d57226ff881b6572c3ed20"
M5 = "5d41402abc4b2a76b9719d911017c592"


def test_file_url_with_name():
    url = parse_url(f"sha1://{H1}/file.dat")
    assert (url.alg, url.hash, url.is_dir, url.name) == ("sha1", H1, False, "file.dat")
    assert str(url) == f"sha1://{H1}/file.dat"


def test_md5_url():
    url = parse_url(f"md5://{M5}/x.bin")
    assert (url.alg, url.hash, url.name) == ("md5", M5, "x.bin")


def test_dir_url_with_label_containing_dots_and_subpath():
    url = parse_url(f"sha1dir://{HD}.ds001.v2/subdir1/file1.txt")
    assert (url.is_dir, url.label, url.path, url.basename) == (True, "ds001.v2", "subdir1/file1.txt", "file1.txt")
    assert str(url) == f"sha1dir://{HD}.ds001.v2/subdir1/file1.txt"


def test_dir_url_without_label_and_with_empty_label():
    assert parse_url(f"sha1dir://{HD}").label is None
    assert parse_url(f"sha1dir://{HD}.").label == ""
    assert str(parse_url(f"sha1dir://{HD}.")) == f"sha1dir://{HD}."


def test_upper_case_hex_is_lowered():
    assert parse_url(f"sha1://{H1.upper()}/a").hash == H1
    assert parse_url(f"SHA1DIR://{HD.upper()}.x").hash == HD


@pytest.mark.parametrize(
    ("rest", "path", "query", "literal"),
    [
        ("c?d", "c", "d", "c?d"),  # the file c with the query d, or the file c?d: the resolver tries c?d first
        ("c?manifest=x", "c", "manifest=x", "c?manifest=x"),
        ("sub/what?/c", "sub/what", "/c", "sub/what?/c"),
        ("c?", "c", "", "c?"),
        ("c", "c", None, None),
    ],
)
def test_the_query_starts_at_the_first_question_mark_and_the_literal_name_is_kept(rest, path, query, literal):
    url = parse_url(f"sha1dir://{HD}.hd/{rest}")
    assert (url.path, url.query, url.literal_path) == (path, query, literal)
    assert parse_url(f"sha1://{H1}/{rest}").literal_path is None


def test_query_is_kept_and_ignored_for_lookup():
    url = parse_url(f"sha1://{H1}/big.dat?manifest={HD}")
    assert url.hash == H1 and url.name == "big.dat" and url.query == f"manifest={HD}"
    assert str(url) == f"sha1://{H1}/big.dat?manifest={HD}"


def test_trailing_slash_is_dropped():
    assert parse_url(f"sha1dir://{HD}.ds/sub/").path == "sub"
    assert parse_url(f"sha1://{H1}/name/").name == "name"


def test_seed_readme_four_slash_typo_is_accepted():
    assert parse_url(f"sha1:////{H1}/dataset.csv").hash == H1


def test_child_joins_subpaths():
    assert str(parse_url(f"sha1dir://{HD}.ds/a").child("b/c")) == f"sha1dir://{HD}.ds/a/b/c"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha1://",
        "sha1://abc",
        f"sha1://{H1}0",
        f"sha1://{H1[:-1]}g",
        f"sha256://{H1}",
        f"md5://{H1}",
        f"http://{H1}",
        f"/tmp/{H1}",
        f"sha1dir://{HD}.ds/../etc",
        f"sha1dir://{HD}.ds/a/./b",
        f"sha1://{H1}\x00/x",
        f"sha1://{H1}.txt/name",
    ],
)
def test_malformed_urls_raise_invalid_url_quoting_the_input(text):
    with pytest.raises(InvalidURL) as info:
        parse_url(text)
    assert repr(text)[1:-1][:20] in str(info.value) or text == ""


def test_non_string_is_invalid_url():
    with pytest.raises(InvalidURL):
        parse_url(None)  # type: ignore[arg-type]


_hex40 = st.text("0123456789abcdef", min_size=40, max_size=40)
_hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
_segment = st.text(
    st.characters(blacklist_characters="/?\x00", blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=8,
)
_name = st.lists(_segment, max_size=3).map("/".join).filter(lambda s: s not in (".", ".."))
_path = st.lists(_segment.filter(lambda s: s not in (".", "..")), max_size=3).map("/".join)
_label = st.none() | st.text(
    st.characters(blacklist_characters="/?\x00", blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=8
)
_query = st.none() | st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=10)


@st.composite
def urls(draw) -> KacheryURL:
    alg = draw(st.sampled_from(["sha1", "md5"]))
    digest = draw(_hex40 if alg == "sha1" else _hex32)
    if draw(st.booleans()):
        return KacheryURL(alg, digest, True, draw(_label), draw(_path), "", draw(_query))
    return KacheryURL(alg, digest, False, None, "", draw(_name), draw(_query))


# Surrounding whitespace is stripped from pasted URLs, so generated parts hold none.
@given(urls())
def test_parse_of_format_is_identity(url):
    assert parse_url(format_url(url)) == url


@given(urls())
def test_format_of_parse_is_identity_on_canonical_text(url):
    text = format_url(url)
    assert format_url(parse_url(text)) == text


@given(st.text(max_size=80))
def test_parser_never_crashes_with_anything_but_invalid_url(text):
    try:
        parse_url(text)
    except InvalidURL:
        pass


@given(st.sampled_from(["sha1://", "sha1dir://", "md5://"]), st.text(max_size=60))
def test_parser_on_scheme_prefixed_garbage(prefix, rest):
    try:
        parse_url(prefix + rest)
    except InvalidURL:
        pass


@pytest.mark.parametrize("label", ["a/b", "", "x?y", "nul\x00", "padded "])
def test_a_label_that_would_not_parse_back_is_refused(label):
    with pytest.raises(InvalidInput):
        check_label(label)


@given(st.text(min_size=1).filter(lambda t: t == t.strip() and not any(c in t for c in "/?\x00")))
def test_an_accepted_label_parses_back(label):
    assert parse_url(f"sha1dir://{H1}.{check_label(label)}").label == label
