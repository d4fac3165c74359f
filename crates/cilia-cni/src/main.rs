//! `cilia-cni`: the CNI plugin binary. The runtime sets `CNI_*` variables and
//! writes the network config on stdin; the result or a CNI error goes to
//! stdout, with a non-zero exit status on error.

use std::io::{Read, Write};

use anyhow::Context;
use cilia_cni::{code, execute, CniError, Env, SocketAgent, SPEC_VERSION};

fn main() -> anyhow::Result<()> {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    // VERSION may come without stdin; a read error is then just no input.
    let read = if env.command.as_deref() == Some("VERSION") {
        Ok(0)
    } else {
        std::io::stdin().read_to_end(&mut stdin)
    };
    let (out, ok) = match read {
        Ok(_) => execute(&env, &stdin, |conf| {
            // STATUS reports the agent's state now; the others wait for it.
            let retry = if env.command.as_deref() == Some("STATUS") {
                std::time::Duration::ZERO
            } else {
                conf.retry()
            };
            SocketAgent::new(&conf.socket()).map(|a| a.with_retry(retry))
        }),
        Err(e) => {
            let err = CniError::new(code::IO_FAILURE, format!("reading stdin: {e}"));
            (format!("{}\n", err.to_json(SPEC_VERSION)), false)
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes()).context("writing stdout")?;
    stdout.flush().context("writing stdout")?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
