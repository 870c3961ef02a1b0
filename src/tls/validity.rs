//! When a certificate is valid: its `notBefore` and `notAfter`, read from
//! the DER, so that an expired certificate is an error at start (and on a
//! reload) instead of a handshake every browser refuses; and whether it
//! signed itself (its issuer is its subject), for the start-up hint.
//!
//! rustls checks *client* chains, not the server's own certificate, and a
//! full X.509 parser is a large dependency for two dates. An X.509
//! certificate is `SEQUENCE { tbsCertificate SEQUENCE { [0] version,
//! serialNumber, signature, issuer, validity SEQUENCE { notBefore,
//! notAfter }, … }, … }` (RFC 5280, 4.1): five steps into the DER.

use std::fmt;
use std::time::{Duration, SystemTime};

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    not_before: SystemTime,
    not_after: SystemTime,
    /// The issuer's name is the subject's: nobody else vouches for it.
    pub self_issued: bool,
}

/// Where a moment falls in a [`Period`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Current,
    /// Expired this long ago.
    Expired(Duration),
    /// Valid only in this long.
    NotYet(Duration),
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = |d: &Duration| d.as_secs().div_ceil(86_400);
        match self {
            Validity::Current => write!(f, "is valid"),
            Validity::Expired(ago) => write!(f, "expired {} day(s) ago", days(ago)),
            Validity::NotYet(until) => write!(f, "is not valid for {} more day(s)", days(until)),
        }
    }
}

impl Period {
    pub fn at(&self, now: SystemTime) -> Validity {
        if let Ok(early) = self.not_before.duration_since(now) {
            Validity::NotYet(early)
        } else if let Ok(late) = now.duration_since(self.not_after) {
            Validity::Expired(late)
        } else {
            Validity::Current
        }
    }
}

/// The validity period of a DER certificate.
pub fn of(der: &[u8]) -> Result<Period, String> {
    let bad = |what: &str| format!("not an X.509 certificate ({what})");
    let (certificate, _) = element(der, SEQUENCE).ok_or_else(|| bad("outer sequence"))?;
    let (mut tbs, _) = element(certificate, SEQUENCE).ok_or_else(|| bad("tbsCertificate"))?;
    if tbs.first() == Some(&VERSION) {
        tbs = element(tbs, VERSION).ok_or_else(|| bad("version"))?.1;
    }
    let (_, rest) = element(tbs, INTEGER).ok_or_else(|| bad("serial number"))?;
    let (_, rest) = element(rest, SEQUENCE).ok_or_else(|| bad("signature algorithm"))?;
    let (issuer, rest) = element(rest, SEQUENCE).ok_or_else(|| bad("issuer"))?;
    let (validity, rest) = element(rest, SEQUENCE).ok_or_else(|| bad("validity"))?;
    let (subject, _) = element(rest, SEQUENCE).ok_or_else(|| bad("subject"))?;
    let (not_before, rest) = time(validity).ok_or_else(|| bad("notBefore"))?;
    let (not_after, _) = time(rest).ok_or_else(|| bad("notAfter"))?;
    Ok(Period {
        not_before,
        not_after,
        self_issued: issuer == subject,
    })
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
/// `[0] EXPLICIT`, the version's tag.
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The contents of the element at the start of `der` if its tag is `tag`,
/// and what follows it.
fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = der.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        // Long form: the low bits count the length's bytes.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A `UTCTime` (`YYMMDDHHMMSSZ`) or `GeneralizedTime` (`YYYYMMDDHHMMSSZ`).
fn time(der: &[u8]) -> Option<(SystemTime, &[u8])> {
    let (text, year_digits, rest) = match *der.first()? {
        UTC_TIME => {
            let (text, rest) = element(der, UTC_TIME)?;
            (text, 2, rest)
        }
        GENERALIZED_TIME => {
            let (text, rest) = element(der, GENERALIZED_TIME)?;
            (text, 4, rest)
        }
        _ => return None,
    };
    if text.len() != year_digits + 11 || text.last() != Some(&b'Z') {
        return None;
    }
    let number = |from: usize, len: usize| -> Option<i64> {
        let digits = std::str::from_utf8(text.get(from..from + len)?).ok()?;
        digits.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        digits.parse().ok()
    };
    let mut year = number(0, year_digits)?;
    if year_digits == 2 {
        // RFC 5280: 50–99 are 1950–1999, 00–49 are 2000–2049.
        year += if year >= 50 { 1900 } else { 2000 };
    }
    let at = year_digits;
    let (month, day) = (number(at, 2)?, number(at + 2, 2)?);
    let (hour, minute, second) = (number(at + 4, 2)?, number(at + 6, 2)?, number(at + 8, 2)?);
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    let moment = if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    };
    Some((moment, rest))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar
/// (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_counted_from_the_unix_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 5), 20_792);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn both_time_forms_are_read() {
        let utc = [
            UTC_TIME, 13, b'2', b'6', b'1', b'2', b'0', b'5', b'0', b'0', b'0', b'0', b'0', b'0',
            b'Z',
        ];
        let (at, rest) = time(&utc).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(20_792 * 86_400)
        );
        let mut general = vec![GENERALIZED_TIME, 15];
        general.extend_from_slice(b"20261205000000Z");
        assert_eq!(time(&general).unwrap().0, at);
    }

    #[test]
    fn anything_else_is_refused_not_misread() {
        assert!(of(b"").is_err());
        assert!(of(&[SEQUENCE, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut letters = vec![UTC_TIME, 13];
        letters.extend_from_slice(b"2612050000xxZ");
        assert!(time(&letters).is_none());
        let mut no_zone = vec![GENERALIZED_TIME, 14];
        no_zone.extend_from_slice(b"20261205000000");
        assert!(time(&no_zone).is_none());
    }
}
