//! Issue 5: property tests of the header and query rules in `src/headers.rs`, over generated header maps and
//! query strings: hop-by-hop removal (RFC 9110 §7.6.1), the `api_token` query rule, the request id, and the
//! forwarding headers. Issue 9: the path rule of `src/access.rs` against RFC 3986 §5.2.4 path resolution.
//! A failing case is shrunk and printed; nothing is written to disk.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::Config;
use zapsign_proxy::access::{check_path, has_dot_segment};
use zapsign_proxy::headers::{ensure_request_id, remove_hop_by_hop, set_forwarding, strip_api_token};

/// The fixed hop-by-hop list, plus `Expect` (the proxy answers `100-continue` itself).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
];

/// End-to-end names the rules must leave alone unless `Connection` names them.
const END_TO_END: &[&str] = &[
    "content-type",
    "content-length",
    "authorization",
    "accept",
    "x-request-id",
    "x-forwarded-for",
    "cookie",
    "x-custom",
];

fn config() -> Config {
    Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A header name: hop-by-hop, well-known end-to-end, or random `x-` names, in random letter case.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(HOP_BY_HOP).prop_map(str::to_owned),
        proptest::sample::select(END_TO_END).prop_map(str::to_owned),
        "x-[a-z0-9-]{1,8}",
    ]
    .prop_flat_map(|n| {
        let len = n.len();
        (Just(n), proptest::collection::vec(any::<bool>(), len))
    })
    .prop_map(|(n, upper)| {
        n.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// A header value: visible ASCII with spaces, or opaque bytes (obs-text), never CR, LF or NUL.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~]{0,24}".prop_map(String::into_bytes),
        proptest::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..16),
    ]
    .prop_map(|v| trim(&v).to_vec())
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// A `Connection` value naming some headers: tokens in any case, odd spacing, empty and invalid members. Only
/// text: a list beside bytes that are not text is covered by `hostile_callers`.
fn connection_value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => name(),
            1 => Just(String::new()),
            1 => Just("close".to_owned()),
            1 => Just("bad name".to_owned()),
            1 => Just("x(y)".to_owned()),
        ],
        0..5,
    )
    .prop_flat_map(|members| {
        let n = members.len();
        (Just(members), proptest::collection::vec("[ \t]{0,2}", n * 2))
    })
    .prop_map(|(members, pads)| {
        members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{}{m}{}", pads[2 * i], pads[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// Header lines in order: random names and values, some `Connection` and `Proxy-Connection` lists among them.
/// `Connection` lines carry text only (see [`connection_value`]).
fn header_lines() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    proptest::collection::vec(
        prop_oneof![
            6 => (name(), value()).prop_filter("Connection lists are text", |(n, v)| {
                !(n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("proxy-connection"))
                    || v.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
            }),
            1 => ("[cC]onnection", connection_value().prop_map(String::into_bytes)),
            1 => ("[pP]roxy-[cC]onnection", connection_value().prop_map(String::into_bytes)),
        ],
        0..16,
    )
}

fn map_of(lines: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (n, v) in lines {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    map
}

/// Lower-case names the `Connection` and `Proxy-Connection` lines of `lines` name (valid tokens only).
fn named_by_connection(lines: &[(String, Vec<u8>)]) -> Vec<String> {
    lines
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("proxy-connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|m| m.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|m| HeaderName::from_bytes(m.as_bytes()).is_ok())
        .collect()
}

/// Every (name, value) of `map` in order, names lower-case.
fn pairs(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

proptest! {
    #![proptest_config(config())]

    /// After removal no hop-by-hop header and no header named by `Connection` is left, every other header is
    /// kept with all its values in order, and a second pass changes nothing.
    #[test]
    fn hop_by_hop_removal_removes_exactly_the_hop_headers(lines in header_lines()) {
        let mut map = map_of(&lines);
        let named = named_by_connection(&lines);
        remove_hop_by_hop(&mut map);
        for hop in HOP_BY_HOP {
            prop_assert!(!map.contains_key(*hop), "{hop} left in {map:?}");
        }
        for n in &named {
            prop_assert!(!map.contains_key(n.as_str()), "{n}, named by Connection, left in {map:?}");
        }
        let expected: Vec<(String, Vec<u8>)> = pairs(&map_of(&lines))
            .into_iter()
            .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()) && !named.contains(n))
            .collect();
        let mut kept = pairs(&map);
        let mut expected_sorted = expected.clone();
        // HeaderMap keeps values of one name together; compare per name, in order.
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        expected_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(&kept, &expected_sorted);
        let mut again = map.clone();
        remove_hop_by_hop(&mut again);
        prop_assert_eq!(again, map);
    }

    /// The caller's id is kept when it is sane; otherwise a fresh sane id replaces it. Either way the returned
    /// id is the one the upstream sees first, and no other header changes.
    #[test]
    fn request_id_is_sane_and_kept_only_when_sane(
        lines in header_lines(),
        caller_id in prop::option::of(prop_oneof![
            "[A-Za-z0-9._:-]{1,128}".prop_map(String::into_bytes),
            "[ -~]{0,140}".prop_map(String::into_bytes),
            proptest::collection::vec(0x80u8..=0xff, 1..8),
        ]),
    ) {
        let mut map = map_of(&lines);
        map.remove("x-request-id");
        if let Some(id) = &caller_id {
            map.insert("x-request-id", HeaderValue::from_bytes(id).unwrap());
        }
        let before = map.clone();
        let id = ensure_request_id(&mut map);
        let sane = |b: &[u8]| {
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        };
        prop_assert!(sane(id.as_bytes()), "{id:?}");
        prop_assert_eq!(map.get("x-request-id"), Some(&id));
        prop_assert_eq!(map.get_all("x-request-id").iter().count(), 1);
        match &caller_id {
            Some(caller) if sane(caller) => prop_assert_eq!(id.as_bytes(), &caller[..]),
            _ => prop_assert_eq!(id.len(), 32),
        }
        let mut rest = map.clone();
        rest.remove("x-request-id");
        let mut rest_before = before;
        rest_before.remove("x-request-id");
        prop_assert_eq!(rest, rest_before);
    }

    /// Generated ids never repeat.
    #[test]
    fn generated_request_ids_are_unique(n in 2usize..64) {
        let ids: std::collections::HashSet<HeaderValue> =
            (0..n).map(|_| ensure_request_id(&mut HeaderMap::new())).collect();
        prop_assert_eq!(ids.len(), n);
    }

    /// One `X-Forwarded-For`: the earlier text values joined, then the caller's address; `X-Forwarded-Proto`
    /// and `X-Forwarded-Host` are ours alone (a caller's spoofed ones are replaced or removed); nothing else
    /// changes.
    #[test]
    fn forwarding_headers_append_the_caller_and_replace_spoofed_values(
        lines in header_lines(),
        earlier in proptest::collection::vec(value(), 0..4),
        spoofed in prop::option::of(("[a-z.]{1,12}", "[a-z]{1,6}")),
        ip in any::<IpAddr>(),
        https in any::<bool>(),
        host in prop::option::of("[a-z0-9.:-]{1,20}"),
    ) {
        let mut map = map_of(&lines);
        for n in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
            map.remove(n);
        }
        for v in &earlier {
            map.append("x-forwarded-for", HeaderValue::from_bytes(v).unwrap());
        }
        if let Some((h, p)) = &spoofed {
            map.insert("x-forwarded-host", HeaderValue::from_str(h).unwrap());
            map.insert("x-forwarded-proto", HeaderValue::from_str(p).unwrap());
        }
        let untouched = {
            let mut m = map.clone();
            for n in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
                m.remove(n);
            }
            m
        };
        let proto = if https { "https" } else { "http" };
        set_forwarding(&mut map, ip, proto, host.as_deref().map(|h| HeaderValue::from_str(h).unwrap()));

        let xff: Vec<&HeaderValue> = map.get_all("x-forwarded-for").iter().collect();
        prop_assert_eq!(xff.len(), 1);
        let mut want: Vec<String> = earlier
            .iter()
            .filter(|v| v.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t'))
            .map(|v| String::from_utf8(v.clone()).unwrap())
            .collect();
        want.push(ip.to_string());
        prop_assert_eq!(xff[0].to_str().unwrap(), want.join(", "));
        prop_assert_eq!(map.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), vec![proto]);
        match &host {
            Some(h) => prop_assert_eq!(map.get_all("x-forwarded-host").iter().collect::<Vec<_>>(), vec![h.as_str()]),
            None => prop_assert!(!map.contains_key("x-forwarded-host")),
        }
        for n in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
            map.remove(n);
        }
        prop_assert_eq!(map, untouched);
    }
}

/// A query parameter that is not `api_token`: a name that never decodes to it, and an optional value.
fn other_param() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        "[a-z_]{1,10}",
        Just("api_tokens".to_owned()),
        Just("my_api_token".to_owned()),
        Just("API_TOKEN".to_owned()),
        Just("api%5Ftokens".to_owned()),
        Just("api_token%".to_owned()),
        Just("api%5".to_owned()),
        "[a-z]{1,4}%[0-9A-F]{2}",
    ]
    .prop_filter("never api_token", |n| !decodes_to_api_token(n));
    let value = "[A-Za-z0-9%=/:._~+-]{0,12}";
    (name, prop::option::of(value)).prop_map(|(n, v)| match v {
        Some(v) => format!("{n}={v}"),
        None => n,
    })
}

/// `api_token` with any of its bytes percent-encoded (either hex case), and a value.
fn api_token_param(secret: &'static str) -> impl Strategy<Value = String> {
    (
        proptest::collection::vec((any::<bool>(), any::<bool>()), 9),
        prop::option::of(Just(secret)),
    )
        .prop_map(|(enc, value)| {
            let name: String = "api_token"
                .bytes()
                .zip(enc)
                .map(|(b, (e, upper))| match (e, upper) {
                    (false, _) => (b as char).to_string(),
                    (true, true) => format!("%{b:02X}"),
                    (true, false) => format!("%{b:02x}"),
                })
                .collect();
            match value {
                Some(v) => format!("{name}={v}"),
                None => name,
            }
        })
}

fn decodes_to_api_token(name: &str) -> bool {
    let b = name.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit() {
            let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            out.push(hex(b[i + 1]) * 16 + hex(b[i + 2]));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out == b"api_token"
}

/// The secret a legacy caller puts in `api_token`; it must never survive.
const SECRET: &str = "S3cr3tT0k3n";

proptest! {
    #![proptest_config(config())]

    /// Inserting `api_token` parameters (any encoding of the name) anywhere into a query and stripping gives back
    /// the query without them, byte for byte; a query of only tokens leaves no query at all.
    #[test]
    fn api_token_params_are_removed_and_everything_else_kept_byte_for_byte(
        kept in proptest::collection::vec(other_param(), 0..6),
        tokens in proptest::collection::vec((api_token_param(SECRET), any::<prop::sample::Index>()), 1..4),
    ) {
        let mut params = kept.clone();
        for (t, at) in &tokens {
            let i = at.index(params.len() + 1);
            params.insert(i, t.clone());
        }
        let query = params.join("&");
        let out = strip_api_token(&query);
        let expected = kept.join("&");
        if kept.iter().all(String::is_empty) {
            prop_assert_eq!(out, None, "query {:?}", query);
        } else {
            prop_assert_eq!(out.as_deref(), Some(expected.as_str()), "query {:?}", query);
        }
        let out = strip_api_token(&query);
        prop_assert!(!out.as_deref().unwrap_or("").contains(SECRET));
        // The result is still a valid request target.
        if let Some(q) = out.as_deref() {
            let target = format!("/p?{q}");
            prop_assert!(http::uri::PathAndQuery::try_from(target).is_ok());
        }
    }

    /// A query with no `api_token` is returned as it is (borrowed: no copy on the hot path); stripping twice is
    /// stripping once.
    #[test]
    fn queries_without_api_token_pass_unchanged_and_stripping_is_idempotent(
        params in proptest::collection::vec(prop_oneof![4 => other_param(), 1 => Just(String::new())], 0..6),
        token in prop::option::of(api_token_param(SECRET)),
    ) {
        let query = params.join("&");
        let out = strip_api_token(&query);
        if query.is_empty() {
            prop_assert_eq!(out, None);
        } else {
            prop_assert!(matches!(out, Some(std::borrow::Cow::Borrowed(q)) if q == query), "{:?}", out);
        }
        let mut with_token = params.clone();
        with_token.extend(token);
        let query = with_token.join("&");
        let once = strip_api_token(&query).map(|c| c.into_owned());
        let twice = once.as_deref().and_then(strip_api_token).map(|c| c.into_owned());
        prop_assert_eq!(once, twice);
    }

    /// Whatever the query (tokens, other parameters, junk), the function never panics and never lets a
    /// parameter named `api_token` through.
    #[test]
    fn no_query_lets_an_api_token_param_through(
        parts in proptest::collection::vec(
            prop_oneof![other_param(), api_token_param(SECRET), "[ -~&&[^&]]{0,12}"],
            0..8,
        ),
    ) {
        let query = parts.join("&");
        if let Some(out) = strip_api_token(&query) {
            for p in out.split('&') {
                let name = p.split('=').next().unwrap_or("");
                prop_assert!(!decodes_to_api_token(name), "{p:?} kept from {query:?}");
            }
        }
    }
}

/// RFC 3986 §6.2.2.2: percent-encoded unreserved characters (`ALPHA / DIGIT / "-" / "." / "_" / "~"`) are
/// equivalent to the characters themselves, and a server may decode them before resolving the path. Other
/// escapes (`%2F` among them) stay as they are.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = char::from((hi * 16 + lo) as u8);
                if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                    out.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    out
}

/// RFC 3986 §5.2.4 `remove_dot_segments`, step by step as the RFC writes it: the reference for what path an
/// upstream resolves.
fn remove_dot_segments(path: &str) -> String {
    /// Step 2C/2D: removes the last segment and its preceding "/" (if any) from the output buffer.
    fn pop_segment(output: &mut String) {
        match output.rfind('/') {
            Some(i) => output.truncate(i),
            None => output.clear(),
        }
    }
    let mut input = path.to_owned();
    let mut output = String::new();
    while !input.is_empty() {
        if input.starts_with("../") {
            input.drain(..3); // 2A
        } else if input.starts_with("./") {
            input.drain(..2); // 2A
        } else if input.starts_with("/./") {
            input.replace_range(..3, "/"); // 2B
        } else if input == "/." {
            input = "/".to_owned(); // 2B
        } else if input.starts_with("/../") {
            input.replace_range(..4, "/"); // 2C
            pop_segment(&mut output);
        } else if input == "/.." {
            input = "/".to_owned(); // 2C
            pop_segment(&mut output);
        } else if input == "." || input == ".." {
            input.clear(); // 2D
        } else {
            // 2E: the first segment, with its leading "/" if any, moves to the output.
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input.drain(..end);
        }
    }
    output
}

/// A path built from pieces that matter to the rule: separators, plain and encoded dots in both cases, encoded
/// slashes and unreserved characters, truncated escapes, and ordinary segments; often after an allowed prefix.
fn request_path() -> impl Strategy<Value = String> {
    const START: &[&str] = &["", "/", "/api/", "/api", "/api/v1/", "/apix/", "/admin/"];
    const PIECES: &[&str] = &[
        "/",
        "/",
        "/",
        ".",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2e%2e",
        ".%2E",
        "%2F",
        "%2f",
        "%5C",
        "\\",
        "a",
        "api",
        "v1",
        "docs",
        "admin",
        "%41",
        "%7E",
        "%61pi",
        "%2",
        "%",
        "-",
        "_",
        "~",
        ".well-known",
    ];
    (
        proptest::sample::select(START),
        proptest::collection::vec(proptest::sample::select(PIECES), 0..14),
    )
        .prop_map(|(start, pieces)| format!("{start}{}", pieces.concat()))
}

/// `access.allow_paths`: one to three prefixes, with and without a trailing slash.
fn allow_paths() -> impl Strategy<Value = Vec<String>> {
    const PREFIXES: &[&str] = &["/api/", "/api", "/api/v1/", "/api/v1/docs/", "/v1/", "/ap"];
    proptest::collection::vec(proptest::sample::select(PREFIXES).prop_map(str::to_owned), 1..4)
}

#[test]
fn the_reference_resolution_follows_the_rfc_examples() {
    // RFC 3986 §5.2.4's own walk-throughs, and the attacks of issue 9.
    assert_eq!(remove_dot_segments("/a/b/c/./../../g"), "/a/g");
    assert_eq!(remove_dot_segments("mid/content=5/../6"), "mid/6");
    assert_eq!(remove_dot_segments("/api/../admin"), "/admin");
    assert_eq!(remove_dot_segments(&decode_unreserved("/api/%2e%2E/admin")), "/admin");
    assert_eq!(remove_dot_segments("/api/.well-known"), "/api/.well-known");
    assert_eq!(decode_unreserved("/%61pi/%2F%7e"), "/api/%2F~");
}

proptest! {
    #![proptest_config(config())]

    /// No path that passes the path check resolves (RFC 3986 §5.2.4, after decoding unreserved escapes)
    /// outside the allowed prefixes: `allow_paths` cannot be walked out of.
    #[test]
    fn no_allowed_path_resolves_outside_the_allowed_prefixes(path in request_path(), allow in allow_paths()) {
        if check_path(&path, &allow).is_ok() {
            let resolved = remove_dot_segments(&decode_unreserved(&path));
            prop_assert!(
                allow.iter().any(|p| resolved.starts_with(&decode_unreserved(p))),
                "{:?} passed the check for {:?} but resolves to {:?}", path, allow, resolved
            );
        }
    }

    /// A path the rule finds no dot segment in resolves to itself: what the prefix check saw is what the
    /// upstream routes on.
    #[test]
    fn paths_without_dot_segments_resolve_to_themselves(path in request_path()) {
        let decoded = decode_unreserved(&path);
        if !has_dot_segment(&path) {
            prop_assert_eq!(remove_dot_segments(&decoded), decoded, "from {:?}", path);
        }
    }

    /// A path the rule refuses really holds a dot segment once decoded, or a `.`/`..` between encoded slashes
    /// or backslashes (the defence in depth): the rule refuses nothing else.
    #[test]
    fn refused_paths_hold_a_dot_segment(path in request_path()) {
        if has_dot_segment(&path) {
            let decoded = decode_unreserved(&path)
                .replace("%2F", "/").replace("%2f", "/").replace("%5C", "/").replace("%5c", "/").replace('\\', "/");
            prop_assert!(decoded.split('/').any(|s| s == "." || s == ".."), "{:?} refused", path);
        }
    }
}
