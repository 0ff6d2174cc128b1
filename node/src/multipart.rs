//! The pieces of `multipart/mixed` (OData `$batch`) that both sides read: the bridge parses
//! Dataverse's batch responses, the emulator parses batch requests.

/// The `boundary` parameter of a `multipart/mixed` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    if !content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/mixed")
    {
        return None;
    }
    content_type.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Header lines and the body, split at the first blank line (CRLF or LF).
pub fn split_head(text: &str) -> (&str, &str) {
    for sep in ["\r\n\r\n", "\n\n"] {
        if let Some(i) = text.find(sep) {
            return (&text[..i], &text[i + sep.len()..]);
        }
    }
    (text, "")
}

/// `Name: value` lines as (lower-case name, trimmed value); other lines are skipped.
pub fn header_lines(head: &str) -> impl Iterator<Item = (String, String)> + '_ {
    head.lines().filter_map(|l| {
        let (k, v) = l.split_once(':')?;
        Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_head_and_headers() {
        assert_eq!(
            boundary("multipart/mixed; boundary=\"batch_1\"").as_deref(),
            Some("batch_1")
        );
        assert_eq!(boundary("application/json; boundary=x"), None);
        assert_eq!(split_head("A: 1\r\n\r\nbody"), ("A: 1", "body"));
        assert_eq!(split_head("no body"), ("no body", ""));
        let h: Vec<_> = header_lines("Content-Type: text/plain\nbad line\nX:  y ").collect();
        assert_eq!(
            h,
            [
                ("content-type".to_string(), "text/plain".to_string()),
                ("x".to_string(), "y".to_string())
            ]
        );
    }
}
