//! Kubernetes resource quantities (`4Gi`, `500M`, `1.5Gi`, `2e9`) as byte counts.
//!
//! The API server validates the syntax (CEL `isQuantity`); this turns an accepted quantity into
//! the integer the planning code compares against. k8s-openapi's `Quantity` is only a string.

use thiserror::Error;

/// A quantity that is not a non-negative byte count.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{input:?} is not a quantity of bytes ({why})")]
pub struct QuantityError {
    input: String,
    why: &'static str,
}

/// Parses a Kubernetes quantity into bytes, rounding fractions of a byte up.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let err = |why| QuantityError { input: input.to_string(), why };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.starts_with('-') {
        return Err(err("negative"));
    }
    let number = number.strip_prefix('+').unwrap_or(number);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err("no digits"));
    }
    if !int_part.chars().all(|c| c.is_ascii_digit()) || !frac_part.chars().all(|c| c.is_ascii_digit()) {
        return Err(err("bad number"));
    }
    // Exact arithmetic: value = digits / 10^frac_len * multiplier, as a rational in u128.
    let digits: u128 = format!("{int_part}{frac_part}").parse().map_err(|_| err("number too large"))?;
    let mut denominator: u128 = 10u128.checked_pow(frac_part.len() as u32).ok_or(err("too many digits"))?;
    let (numerator_mul, denominator_mul): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        e if e.starts_with(['e', 'E']) => {
            let exp: u32 = e[1..].parse().map_err(|_| err("bad exponent"))?;
            (10u128.checked_pow(exp).ok_or(err("exponent too large"))?, 1)
        }
        _ => return Err(err("unknown suffix")),
    };
    denominator = denominator.checked_mul(denominator_mul).ok_or(err("too small"))?;
    let numerator = digits.checked_mul(numerator_mul).ok_or(err("too large"))?;
    let bytes = numerator.div_ceil(denominator);
    u64::try_from(bytes).map_err(|_| err("too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("4Gi"), Ok(4 << 30));
        assert_eq!(parse_bytes("500Mi"), Ok(500 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("2e3"), Ok(2000));
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn fractions_of_a_byte_round_up() {
        assert_eq!(parse_bytes("1500m"), Ok(2));
        assert_eq!(parse_bytes("0.1"), Ok(1));
    }

    #[test]
    fn refuses_what_is_not_a_byte_count() {
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("-1Gi").is_err());
        assert!(parse_bytes("4GB").is_err());
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("1.2.3").is_err());
        assert!(parse_bytes("99999999999Ei").is_err());
    }
}
