//! Standard output: every line the CLI prints goes through [`outln!`], and
//! the table and JSON printers here.
//!
//! A closed standard output (the reader of a pipe is gone, as in
//! `cilia observe | head -3`) ends the process quietly with status 0: the
//! reader has all it wanted, so it is neither an error message nor a failure
//! that would stop a `set -o pipefail` script. Any other write error is one
//! line on stderr and status 1. (Rust ignores SIGPIPE, so a plain
//! `println!` would panic instead; `clippy::print_stdout` keeps it out.)

use std::collections::BTreeMap;
use std::io::Write;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
    /// YAML (policy get only).
    Yaml,
}

impl Output {
    /// Whether a command prints machine-readable data (JSON, or YAML where
    /// a command has it) rather than a table.
    pub fn json(self) -> bool {
        self != Output::Table
    }
}

/// `println!` for the CLI's standard output; see the module doc for what a
/// failed write does.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}

pub fn write_line(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        stdout_failed(&e)
    }
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("Error: writing standard output: {e}");
    std::process::exit(1)
}

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints a value as JSON, or as `table` prints it.
pub fn print_one<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&T),
) -> anyhow::Result<()> {
    if output.json() {
        print_json(value)
    } else {
        table(value);
        Ok(())
    }
}

/// Prints a list as JSON, or as a table with one row per item.
pub fn print_rows<T: serde::Serialize>(
    output: Output,
    list: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    print_one(output, &list, |list| {
        print_table(header, list.iter().map(row).collect())
    })
}

/// The cells of one table row, each as its value displays.
pub fn cells(values: &[&dyn std::fmt::Display]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// Prints rows as aligned columns.
pub fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    outln!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    for row in rows {
        outln!("{}", line(row));
    }
}

/// Labels as `k=v,k` (a key without value alone), or `-` for none.
pub fn labels_of(map: &BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}
