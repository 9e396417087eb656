//! Output for people and scripts: aligned tables, JSON, a progress line.

use std::io::{IsTerminal, Write};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Prints rows as an aligned table with a header.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(widths[i].saturating_sub(cell.chars().count())));
            }
        }
        out.trim_end().to_owned()
    };
    println!("{}", line(headers.to_vec()));
    for row in rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
}

/// Prints a JSON value.
pub(crate) fn json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// A progress line on stderr, shown only when a person is watching (stdout
/// and stderr are terminals), never in scripts or logs.
pub(crate) struct Progress {
    label: String,
    total: u64,
    shown: bool,
}

impl Progress {
    /// A progress line for `total` units.
    pub(crate) fn new(label: &str, total: u64) -> Self {
        Self {
            label: label.to_owned(),
            total,
            shown: std::io::stdout().is_terminal() && std::io::stderr().is_terminal(),
        }
    }

    /// Updates the line.
    pub(crate) fn set(&self, done: u64) {
        if !self.shown {
            return;
        }
        let total = self.total.max(1);
        let filled = (done.min(total) * 30 / total) as usize;
        eprint!(
            "\r{} [{}{}] {done}/{}",
            self.label,
            "#".repeat(filled),
            " ".repeat(30 - filled),
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    /// Ends the line.
    pub(crate) fn finish(&self) {
        if self.shown {
            eprintln!();
        }
    }
}
