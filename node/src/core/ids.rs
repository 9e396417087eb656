//! Identifiers: origin ids, offer ids, hex.

/// Longest origin or offer id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// `text` quoted for a message, cut after 64 characters: errors and logs
/// never repeat a whole oversized input.
pub fn quote(text: &str) -> String {
    const SHOWN: usize = 64;
    match text.char_indices().nth(SHOWN) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

/// Checks an origin id against `[a-z0-9][a-z0-9-]{0,63}`.
pub fn check_origin_id(id: &str) -> Result<(), String> {
    check_slug(id).map_err(|why| format!("origin id {} {why}", quote(id)))
}

/// Checks an offer id or category (same shape as an origin id).
pub fn check_slug(id: &str) -> Result<(), String> {
    let bytes = id.as_bytes();
    let Some(first) = bytes.first() else {
        return Err("is empty".into());
    };
    if bytes.len() > MAX_ID_LEN {
        return Err(format!("is longer than {MAX_ID_LEN} bytes"));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err("must start with a-z or 0-9".into());
    }
    if let Some(bad) = bytes
        .iter()
        .find(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'-'))
    {
        return Err(format!(
            "may hold only a-z, 0-9 and '-', found {:?}",
            *bad as char
        ));
    }
    Ok(())
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[(byte >> 4) as usize] as char);
        out.push(DIGITS[(byte & 0xf) as usize] as char);
    }
    out
}

/// Parses lowercase or uppercase hex.
pub fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("hex {} has an odd number of digits", quote(text)));
    }
    // By bytes: any text may arrive, and a pair may split a character.
    let digit = |b: u8| char::from(b).to_digit(16);
    text.as_bytes()
        .chunks(2)
        .map(|pair| match (digit(pair[0]), digit(pair[1])) {
            (Some(high), Some(low)) => Ok((high * 16 + low) as u8),
            _ => Err(format!("not hex: {}", quote(text))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_any_text_is_refused_cleanly() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            [0, 1, 0xab, 0xff]
        );
        assert_eq!(unhex("ABff").unwrap(), [0xab, 0xff]);
        // "aéa" is 4 bytes: a byte pair splits the 'é'.
        for bad in ["aéa", "zz", "abc", "0x12"] {
            assert!(unhex(bad).is_err(), "{bad}");
        }
        let long = "g".repeat(10_000);
        let message = unhex(&long).unwrap_err();
        assert!(
            message.len() < 200 && message.contains("10000 bytes"),
            "{message}"
        );
    }

    #[test]
    fn origin_ids() {
        for good in ["br-ibge-3550308", "a", "0-city", &"a".repeat(64)] {
            assert!(check_origin_id(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "são-paulo", "a_b", &"a".repeat(65), "a\0"] {
            assert!(check_origin_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hex_round_trip() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&bytes), "0001abff");
        assert_eq!(unhex("0001ABff").unwrap(), bytes);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }
}
