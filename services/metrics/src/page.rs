//! Page tokens of `Query`: opaque to clients, they carry the position of the last
//! record of the previous page, `<time_micros>:<seq>` in URL-safe base64 (records
//! are listed newest first, ties broken by arrival order).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::MetricsError;
use crate::store::Cursor;

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

pub fn encode(cursor: Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", cursor.time_micros, cursor.seq))
}

/// `None` for an empty token (the first page).
pub fn decode(token: &str) -> Result<Option<Cursor>, MetricsError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| MetricsError::InvalidPageToken)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| MetricsError::InvalidPageToken)?;
    let (time, seq) = text.split_once(':').ok_or(MetricsError::InvalidPageToken)?;
    match (time.parse::<i64>(), seq.parse::<i64>()) {
        (Ok(time_micros), Ok(seq)) if time_micros >= 0 && seq > 0 => {
            Ok(Some(Cursor { time_micros, seq }))
        }
        _ => Err(MetricsError::InvalidPageToken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            time_micros: 1_700_000_000_000_000,
            seq: 42,
        };
        assert_eq!(decode(&encode(cursor)).unwrap(), Some(cursor));
        assert_eq!(decode("").unwrap(), None);
        for bad in [
            "***".to_owned(),
            URL_SAFE_NO_PAD.encode("42"),
            URL_SAFE_NO_PAD.encode("a:1"),
            URL_SAFE_NO_PAD.encode("1:0"),
            URL_SAFE_NO_PAD.encode("-1:3"),
        ] {
            assert!(
                matches!(decode(&bad), Err(MetricsError::InvalidPageToken)),
                "{bad}"
            );
        }
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0), 50);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(501), 500);
    }
}
