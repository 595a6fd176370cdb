//! Page tokens of `Query`: opaque to clients, they carry the sequence of the last
//! event of the previous page (URL-safe base64 of its decimal digits).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::AuditError;

/// Page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page size; larger requests are capped.
pub const MAX_PAGE_SIZE: u32 = 500;

/// The page size to use for a requested one (0 means the default).
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

pub fn encode(last_sequence: i64) -> String {
    URL_SAFE_NO_PAD.encode(last_sequence.to_string())
}

/// `None` for an empty token (the first page).
pub fn decode(token: &str) -> Result<Option<i64>, AuditError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| AuditError::InvalidPageToken)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| AuditError::InvalidPageToken)?;
    match text.parse::<i64>() {
        Ok(sequence) if sequence > 0 && text == sequence.to_string() => Ok(Some(sequence)),
        _ => Err(AuditError::InvalidPageToken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(decode(&encode(42)).unwrap(), Some(42));
        assert_eq!(decode("").unwrap(), None);
        for bad in [
            "***",
            "not base64!",
            &URL_SAFE_NO_PAD.encode("abc"),
            &URL_SAFE_NO_PAD.encode("-1"),
            &URL_SAFE_NO_PAD.encode("007"),
        ] {
            assert!(
                matches!(decode(bad), Err(AuditError::InvalidPageToken)),
                "{bad}"
            );
        }
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0), 50);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(10_000), 500);
    }
}
