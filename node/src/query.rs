//! Queries over the store: current observations (filtered, keyset-paged)
//! and offers with their state. Free of gRPC types.

use civex_proto::v1::FunctionalArea;

use crate::{
    core::{
        ids::{hex, unhex},
        index::ObservationKey,
        period::Period,
    },
    store::{ObservationRow, OfferRow, ResponseRow, Store, StoreError},
};

/// Largest page.
pub const MAX_PAGE: usize = 1000;
/// Page size when none is asked.
pub const DEFAULT_PAGE: usize = 100;

/// A query problem.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A filter is wrong; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Observation filter. Empty lists do not filter.
#[derive(Debug, Clone, Default)]
pub struct ObservationFilter {
    /// Areas.
    pub areas: Vec<FunctionalArea>,
    /// Indicator codes.
    pub indicators: Vec<String>,
    /// Origins.
    pub origins: Vec<String>,
    /// Earliest period.
    pub period_from: Option<String>,
    /// Latest period.
    pub period_to: Option<String>,
}

/// A page of current observations.
#[derive(Debug, Clone)]
pub struct ObservationPage {
    /// Rows, in key order.
    pub rows: Vec<ObservationRow>,
    /// Token for the next page.
    pub next: Option<String>,
}

fn encode_token(key: &ObservationKey) -> String {
    hex(key.parts().join("\0").as_bytes())
}

fn decode_token(token: &str) -> Result<ObservationKey, QueryError> {
    let invalid = || QueryError::Invalid("page_token: not a token this node issued".into());
    let bytes = unhex(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let parts: Vec<&str> = text.split('\0').collect();
    let [origin, indicator, catalog_edition, ref_area, period, breakdown] = parts[..] else {
        return Err(invalid());
    };
    Ok(ObservationKey {
        origin: origin.into(),
        indicator: indicator.into(),
        catalog_edition: catalog_edition.into(),
        ref_area: ref_area.into(),
        period: period.into(),
        breakdown: breakdown.into(),
    })
}

fn parse_bound(field: &str, text: &Option<String>) -> Result<Option<Period>, QueryError> {
    text.as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| Period::parse(t).map_err(|m| QueryError::Invalid(format!("{field}: {m}"))))
        .transpose()
}

fn full_page(rows: Vec<ObservationRow>) -> ObservationPage {
    ObservationPage {
        next: rows.last().map(|r| encode_token(&r.key)),
        rows,
    }
}

/// Current observations matching `filter`, one page after `page_token`.
/// The current value of a key is its latest entry that is not retracted.
pub fn observations(
    store: &dyn Store,
    filter: &ObservationFilter,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<ObservationPage, QueryError> {
    let limit = match page_size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let from = parse_bound("period_from", &filter.period_from)?;
    let to = parse_bound("period_to", &filter.period_to)?;
    let after = page_token
        .filter(|t| !t.is_empty())
        .map(decode_token)
        .transpose()?;
    let matches = |row: &ObservationRow| {
        (filter.areas.is_empty()
            || filter
                .areas
                .iter()
                .any(|a| *a as i32 == row.observation.area))
            && (filter.indicators.is_empty() || filter.indicators.contains(&row.key.indicator))
            && Period::parse(&row.key.period).is_ok_and(|p| p.within(from.as_ref(), to.as_ref()))
    };
    let mut origins: Vec<Option<&str>> = if filter.origins.is_empty() {
        vec![None]
    } else {
        filter.origins.iter().map(|o| Some(o.as_str())).collect()
    };
    origins.sort();
    origins.dedup();

    let mut rows = Vec::new();
    for origin in origins {
        let after_here = match (&after, origin) {
            (Some(after), Some(origin)) if after.origin.as_str() > origin => continue,
            (Some(after), Some(origin)) if after.origin.as_str() < origin => None,
            (after, _) => after.as_ref(),
        };
        let mut current: Option<ObservationRow> = None;
        let mut group_key: Option<ObservationKey> = None;
        // Moves a finished group's current row into the page; true when full.
        let take = |current: &mut Option<ObservationRow>, rows: &mut Vec<ObservationRow>| {
            if let Some(row) = current.take().filter(|row| matches(row)) {
                rows.push(row);
            }
            rows.len() >= limit
        };
        for row in store.observation_rows(origin, after_here) {
            let row = row?;
            if group_key.as_ref() != Some(&row.key) {
                if take(&mut current, &mut rows) {
                    return Ok(full_page(rows));
                }
                group_key = Some(row.key.clone());
            }
            if !store.is_retracted(&row.key.origin, row.seq)? {
                current = Some(row);
            }
        }
        if take(&mut current, &mut rows) {
            return Ok(full_page(rows));
        }
    }
    Ok(ObservationPage { rows, next: None })
}

/// Offer filter. Empty lists do not filter.
#[derive(Debug, Clone, Default)]
pub struct OfferFilter {
    /// Areas.
    pub areas: Vec<FunctionalArea>,
    /// Categories.
    pub categories: Vec<String>,
    /// Origins.
    pub origins: Vec<String>,
    /// Also inactive offers.
    pub include_inactive: bool,
}

/// An offer's latest version and its state.
#[derive(Debug, Clone)]
pub struct OfferState {
    /// Latest version.
    pub version: OfferRow,
    /// Active by the reader's clock.
    pub active: bool,
    /// Responses held for the offer.
    pub responses: Vec<ResponseRow>,
}

/// Offers matching `filter`, by origin and offer id. Active means: the
/// latest version, not withdrawn, not retracted, and `now` inside
/// `[valid_from, valid_until)`.
pub fn offers(
    store: &dyn Store,
    filter: &OfferFilter,
    now_unix: i64,
) -> Result<Vec<OfferState>, QueryError> {
    let mut latest: Vec<OfferRow> = Vec::new();
    for row in store.offer_versions()? {
        match latest.last_mut() {
            Some(last)
                if last.origin == row.origin && last.offer.offer_id == row.offer.offer_id =>
            {
                if row.seq > last.seq {
                    *last = row;
                }
            }
            _ => latest.push(row),
        }
    }
    let mut out = Vec::new();
    for version in latest {
        let offer = &version.offer;
        let wanted = (filter.areas.is_empty()
            || filter.areas.iter().any(|a| *a as i32 == offer.area))
            && (filter.categories.is_empty() || filter.categories.contains(&offer.category))
            && (filter.origins.is_empty() || filter.origins.contains(&version.origin));
        if !wanted {
            continue;
        }
        let active = store
            .withdrawal(&version.origin, &offer.offer_id)?
            .is_none()
            && !store.is_retracted(&version.origin, version.seq)?
            && (offer.valid_from_unix..offer.valid_until_unix).contains(&now_unix);
        if !active && !filter.include_inactive {
            continue;
        }
        let responses = store.responses(&version.origin, &offer.offer_id)?;
        out.push(OfferState {
            version,
            active,
            responses,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let key = ObservationKey {
            origin: "city-a".into(),
            indicator: "x".into(),
            catalog_edition: "local".into(),
            ref_area: "city-a".into(),
            period: "2025".into(),
            breakdown: String::new(),
        };
        assert_eq!(decode_token(&encode_token(&key)).unwrap(), key);
        assert!(decode_token("zz").is_err());
        assert!(decode_token(&hex(b"a\0b")).is_err());
    }
}
