//! A reader that closes the pipe early (`cilia … | head -3`) ends the CLI
//! quietly with status 0: no panic, no error message (README, "Using it").

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// A policy stream whose `validate` listing (one line per document) is
/// several times a pipe's 64 KiB buffer, so the CLI is still writing when
/// the reader goes away.
fn many_policies(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p{i}\n\
                 spec:\n  endpointSelector:\n    matchLabels:\n      app: a\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn a_reader_closing_the_pipe_early_ends_the_cli_quietly_with_status_0() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cilia"))
        .args(["--socket", "/nonexistent/cilia.sock"])
        .args(["policy", "validate", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cilia");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(many_policies(5000).as_bytes())
        .expect("write stdin");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read the first line");
    // The reader (and with it the pipe's read end) is dropped here.
    assert_eq!(first, "stdin: read 5000 document(s)\n");
    let out = child.wait_with_output().expect("cilia ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{:?}", out.status);
}
