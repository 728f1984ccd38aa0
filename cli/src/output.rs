//! Everything that turns data into text for a human: tables, relative times, sizes, errors.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes to stdout. A closed pipe (`wpm fleet status | head`) ends the program quietly
/// instead of panicking the way `println!` does.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let result = out
        .write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        })
        .and_then(|()| out.flush());
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Pretty JSON on stdout.
pub fn emit_json(value: &serde_json::Value) {
    // Serializing a Value cannot fail.
    emit(&serde_json::to_string_pretty(value).unwrap_or_default());
}

/// `error: top message` then each cause on its own line, like the operator expects from a
/// CLI: no backtrace, no Debug formatting.
pub fn print_error(err: &anyhow::Error) {
    let mut text = format!("error: {err}\n");
    for cause in err.chain().skip(1) {
        text.push_str(&format!("  caused by: {cause}\n"));
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "3s ago", "5m ago", "2h ago", "4d ago"; "never" for no timestamp. Device clocks can run
/// slightly ahead of ours, so a time in the future reads "just now" rather than negative.
pub fn relative_time(at_ms: Option<u64>, now_ms: u64) -> String {
    let Some(at) = at_ms.filter(|&t| t > 0) else {
        return "never".to_string();
    };
    if at > now_ms {
        return "just now".to_string();
    }
    let secs = (now_ms - at) / 1000;
    match secs {
        0 => "just now".to_string(),
        1..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// "in 29d", "in 3h" for times ahead; falls back to `relative_time` for the past.
pub fn relative_future(at_ms: u64, now_ms: u64) -> String {
    if at_ms <= now_ms {
        return relative_time(Some(at_ms), now_ms);
    }
    let secs = (at_ms - now_ms) / 1000;
    match secs {
        0..=59 => format!("in {secs}s"),
        60..=3599 => format!("in {}m", secs / 60),
        3600..=86_399 => format!("in {}h", secs / 3600),
        _ => format!("in {}d", secs / 86_400),
    }
}

/// 1536 -> "1.5 KiB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A plain left-aligned text table; widths count characters, not bytes, so names with
/// non-ASCII letters still line up.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut l = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                l.push_str(cell);
                if i + 1 < cols {
                    let pad = width - cell.chars().count() + 2;
                    l.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&self.headers);
        for row in &self.rows {
            line(row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times() {
        let now = 1_000_000_000;
        assert_eq!(relative_time(None, now), "never");
        assert_eq!(relative_time(Some(0), now), "never");
        assert_eq!(relative_time(Some(now - 3_000), now), "3s ago");
        assert_eq!(relative_time(Some(now - 300), now), "just now");
        assert_eq!(relative_time(Some(now + 5_000), now), "just now");
        assert_eq!(relative_time(Some(now - 125_000), now), "2m ago");
        assert_eq!(relative_time(Some(now - 7_200_000), now), "2h ago");
        assert_eq!(relative_time(Some(now - 3 * 86_400_000), now), "3d ago");
        assert_eq!(relative_future(now + 30 * 86_400_000, now), "in 30d");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["DEVICE", "ONLINE"]);
        t.row(vec!["sim-0".into(), "yes".into()]);
        t.row(vec!["a-much-longer-name".into(), "no".into()]);
        assert_eq!(
            t.render(),
            "DEVICE              ONLINE\nsim-0               yes\na-much-longer-name  no\n"
        );
    }
}
