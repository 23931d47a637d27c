//! Waiting before a retry: the server's `Retry-After` when it sends one, otherwise an
//! exponential backoff with jitter, so clients that failed together do not retry together.

use std::time::Duration;

use rand::Rng;

/// The wait a `Retry-After` header asks for: delta-seconds or an HTTP date (RFC 9110 10.2.3).
/// A date in the past means no wait; anything unreadable is ignored.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The wait before retry number `attempt` (1 = the first retry): 0.5 s, 1 s, 2 s, ... up to
/// 16 s, each times a random factor in 0.5..1.5.
pub fn jittered(attempt: u32) -> Duration {
    let base = Duration::from_millis(250 * (1 << attempt.clamp(1, 6)));
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after(&with("7")), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&with(" 0 ")), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderMap::new()), None);
        assert_eq!(retry_after(&with("soon")), None);
        assert_eq!(
            retry_after(&with("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO),
            "a date in the past: no wait"
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(90)).to_rfc2822();
        let wait = retry_after(&with(&later)).unwrap();
        assert!(
            wait > Duration::from_secs(80) && wait <= Duration::from_secs(90),
            "{wait:?}"
        );
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for attempt in 0..20 {
            let base = 250.0 * f64::from(1u32 << attempt.clamp(1, 6));
            let ms = jittered(attempt).as_secs_f64() * 1000.0;
            assert!(ms >= base * 0.5 && ms <= base * 1.5, "{attempt}: {ms}");
        }
    }
}
