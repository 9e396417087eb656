//! ISO 8601 reporting periods: `2025`, `2025-S1`, `2025-Q3`, `2025-07`.

/// A period as an inclusive range of months, counted from year 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// First month (year * 12 + month - 1).
    pub first_month: u32,
    /// Last month, inclusive.
    pub last_month: u32,
}

impl Period {
    /// Parses a period, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad =
            || format!("{text:?} is not an ISO 8601 period (YYYY, YYYY-Sn, YYYY-Qn or YYYY-MM)");
        // Every valid period is ASCII; the slicing below counts bytes.
        if !text.is_ascii() {
            return Err(bad());
        }
        let (year, rest) = match text.split_once('-') {
            Some((year, rest)) => (year, Some(rest)),
            None => (text, None),
        };
        if year.len() != 4 || !year.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let year: u32 = year.parse().map_err(|_| bad())?;
        if year < 1900 {
            return Err(format!("{text:?}: year before 1900"));
        }
        let base = year * 12;
        let (first, len) = match rest {
            None => (0, 12),
            Some(rest) => {
                let (kind, number) = rest.split_at(rest.len().min(1));
                let number_of = |max: u32| -> Result<u32, String> {
                    match number.parse::<u32>() {
                        Ok(n) if (1..=max).contains(&n) && number.len() == 1 => Ok(n),
                        _ => Err(bad()),
                    }
                };
                match kind {
                    "S" => (6 * (number_of(2)? - 1), 6),
                    "Q" => (3 * (number_of(4)? - 1), 3),
                    _ => {
                        if rest.len() != 2 || !rest.bytes().all(|b| b.is_ascii_digit()) {
                            return Err(bad());
                        }
                        match rest.parse::<u32>() {
                            Ok(month @ 1..=12) => (month - 1, 1),
                            _ => return Err(bad()),
                        }
                    }
                }
            }
        };
        Ok(Self {
            first_month: base + first,
            last_month: base + first + len - 1,
        })
    }

    /// Whether this period lies inside `[from, to]` (either bound optional).
    pub fn within(&self, from: Option<&Period>, to: Option<&Period>) -> bool {
        from.is_none_or(|from| self.first_month >= from.first_month)
            && to.is_none_or(|to| self.last_month <= to.last_month)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_to_month_ranges() {
        let year = Period::parse("2025").unwrap();
        assert_eq!(year.last_month - year.first_month, 11);
        let q3 = Period::parse("2025-Q3").unwrap();
        assert_eq!(q3.first_month, 2025 * 12 + 6);
        assert_eq!(q3.last_month, 2025 * 12 + 8);
        assert_eq!(Period::parse("2025-07").unwrap().first_month, 2025 * 12 + 6);
        assert_eq!(Period::parse("2025-S2").unwrap().last_month, 2025 * 12 + 11);
        for bad in [
            "",
            "25",
            "2025-13",
            "2025-Q5",
            "2025-Q",
            "2025-7",
            "2025-W01",
            "abcd",
            "2025-Q12",
            "2025-é1",
            "2025-–1",
            "２０２５",
            "2025-",
        ] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn within_a_range() {
        let p = |t| Period::parse(t).unwrap();
        assert!(p("2025-Q3").within(Some(&p("2025")), Some(&p("2025"))));
        assert!(!p("2025").within(Some(&p("2025-Q2")), None));
        assert!(p("2025-07").within(None, Some(&p("2025-Q3"))));
        assert!(!p("2026-01").within(None, Some(&p("2025"))));
    }
}
