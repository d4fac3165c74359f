//! Hotfix: `cilia datapath reload` swaps every endpoint's programs inside
//! their pinned links while traffic flows: no ping is lost and no TCP
//! connection is reset, and each link keeps its id while its program is new.
//! An agent that starts and finds another build's program swaps its own in.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cilia_datapath::inspect::{link_target, program_tag};
use cilia_testnet::{ip_of, privileged, AgentOptions, Netns, TestAgent};

/// Reloads the datapath (forced: this build's programs are swapped too)
/// and checks every endpoint was reloaded.
fn reload(agent: &TestAgent, endpoints: usize) -> serde_json::Value {
    let r = agent.cli_json(&["datapath", "reload", "--force"]);
    assert_eq!(r["reloaded"], endpoints, "{r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    r
}

/// What a TCP stream saw.
#[derive(Debug)]
struct StreamReport {
    round_trips: u64,
    bytes: u64,
    error: Option<String>,
}

const CHUNK: usize = 4096;

/// A long-lived TCP connection from `client` to `server`'s `addr`: the
/// client sends numbered 4 KiB chunks and reads each back from the echoing
/// server (about a thousand a second) until `stop`, then closes. Any reset, timeout or corrupted byte
/// ends it with an error.
fn tcp_stream(
    server: &Netns,
    client: &Netns,
    addr: IpAddr,
    stop: Arc<AtomicBool>,
) -> JoinHandle<StreamReport> {
    let listener = server.run(|| TcpListener::bind(SocketAddr::new(addr, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let conn = client.run(|| {
        TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(5)).unwrap()
    });
    std::thread::spawn(move || {
        let mut conn = conn;
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut report = StreamReport {
            round_trips: 0,
            bytes: 0,
            error: None,
        };
        let mut back = vec![0u8; CHUNK];
        // Bounded in time even if `stop` never comes.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let n = report.round_trips;
            let chunk: Vec<u8> = (0..CHUNK).map(|i| (n as usize + i) as u8).collect();
            let step = conn
                .write_all(&chunk)
                .and_then(|()| conn.read_exact(&mut back));
            if let Err(e) = step {
                report.error = Some(format!("after {n} round trips: {e}"));
                break;
            }
            if back != chunk {
                report.error = Some(format!("round trip {n}: echoed bytes differ"));
                break;
            }
            report.round_trips += 1;
            report.bytes += CHUNK as u64;
            // Paced, so two streams leave the (shared) CPUs to the reloads.
            std::thread::sleep(Duration::from_micros(500));
        }
        let _ = conn.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        if report.error.is_none() {
            if let Err(e) = conn.read_to_end(&mut rest) {
                report.error = Some(format!("closing: {e}"));
            }
        }
        echo.join().unwrap();
        report
    })
}

/// Sent and received counts from ping's summary line.
fn ping_counts(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {out}"));
    let num = |word: &str| -> u64 {
        let before = line.split(word).next().unwrap();
        before
            .trim_end()
            .rsplit([' ', ','])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num(" packets transmitted"), num(" received"))
}

#[test]
fn a_reload_under_ping_floods_and_tcp_streams_loses_no_packet_and_resets_no_connection() {
    privileged!("reload_under_traffic");
    let agent = TestAgent::start(AgentOptions::default());
    let (c1, c2) = (Netns::new("crl").unwrap(), Netns::new("crl").unwrap());
    agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");

    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = ["ipv6", "ipv4"]
        .iter()
        .map(|f| tcp_stream(&c2, &c1, ip_of(&b, f), stop.clone()))
        .collect();
    // Echo requests 2 ms apart per family, enough of them to outlast the
    // reloads with a wide margin (one is timed here, without traffic),
    // bounded by a 120 s deadline.
    const RELOADS: u32 = 5;
    const PAUSE: Duration = Duration::from_millis(200);
    let started = Instant::now();
    reload(&agent, 2);
    let span = (started.elapsed() + PAUSE) * RELOADS * 3;
    let pings = (span.as_millis() / 2).clamp(5000, 40_000).to_string();
    let pingers: Vec<_> = ["ipv6", "ipv4"]
        .iter()
        .map(|f| {
            c1.command("ping")
                .args(["-q", "-c", &pings, "-i", "0.002", "-W", "2", "-w", "120"])
                .arg(ip_of(&b, f).to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();

    // Reload for as long as the pings run (their count is sized for RELOADS
    // reloads at the pace timed above; on a busier machine fewer fit, and
    // that is fine as long as one did): never past the pings, so every
    // reload is under traffic.
    std::thread::sleep(PAUSE);
    let started = Instant::now();
    let mut pingers = pingers;
    let mut reloads = 0;
    while reloads < RELOADS * 4 && pingers.iter_mut().all(|p| p.try_wait().unwrap().is_none()) {
        reload(&agent, 2);
        reloads += 1;
        std::thread::sleep(PAUSE);
    }
    println!("{reloads} reloads under traffic in {:?}", started.elapsed());
    assert!(
        reloads >= 2,
        "only {reloads} reload(s) fit while the pings ran"
    );

    let mut lost = 0;
    for (family, pinger) in ["ipv6", "ipv4"].iter().zip(pingers) {
        let out = pinger.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (sent, received) = ping_counts(&text);
        println!("ping {family}: {sent} sent, {received} received across {reloads} reloads");
        assert_eq!(sent.to_string(), pings, "{text}");
        lost += sent - received;
    }
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<StreamReport> = streams.into_iter().map(|s| s.join().unwrap()).collect();
    for (family, r) in ["ipv6", "ipv4"].iter().zip(&reports) {
        println!(
            "tcp {family}: {} round trips, {} bytes echoed, error: {:?}",
            r.round_trips, r.bytes, r.error
        );
    }
    assert_eq!(lost, 0, "pings lost during reloads");
    for r in &reports {
        assert!(r.error.is_none(), "a TCP stream broke: {r:?}");
        assert!(r.round_trips > 0, "the stream carried data: {r:?}");
    }
}

#[test]
fn a_reload_swaps_each_program_inside_its_pinned_link() {
    privileged!("reload_swaps_programs");
    let agent = TestAgent::start(AgentOptions::default());
    let ns = Netns::new("crl").unwrap();
    let ep = agent.create_endpoint(&ns, "app=a");
    let id = ep["id"].as_u64().unwrap();
    let targets = || {
        [format!("ep{id}"), format!("ep{id}_to")]
            .iter()
            .map(|p| link_target(&agent.bpf_root.path().join("links").join(p)).unwrap())
            .collect::<Vec<_>>()
    };
    let before = targets();

    let r = reload(&agent, 1);
    let after = targets();
    let links = r["endpoints"][0]["links"].as_array().unwrap();
    assert_eq!(links.len(), 2);
    for ((old, new), link) in before.iter().zip(&after).zip(links) {
        assert_eq!(old.link_id, new.link_id, "the link stays");
        assert_ne!(old.program_id, new.program_id, "the program is new");
        assert_eq!(link["link_id"], new.link_id);
        assert_eq!(link["old_program_id"], old.program_id);
        assert_eq!(link["new_program_id"], new.program_id);
    }

    // Without --force, this build's programs are left alone.
    let r = agent.cli_json(&["datapath", "reload"]);
    assert_eq!(r["unchanged"], 1, "{r:#}");
    assert_eq!(r["endpoints"][0]["outcome"], "unchanged");
    assert_eq!(targets(), after);
    let table = agent.cli_ok(&["datapath", "reload"]);
    assert!(
        table.contains("0 reloaded, 1 unchanged, 0 failed"),
        "{table}"
    );
}

/// Puts a program of other code (the probe object's empty classifier) into
/// the link pinned at `pin`, as an older cilia build would have left it.
fn swap_in_another_builds_program(pin: &std::path::Path) {
    use aya::programs::links::{FdLink, PinnedLink};
    let mut probe = aya::Ebpf::load(cilia_datapath::object::PROBE_OBJECT).unwrap();
    let prog: &mut aya::programs::SchedClassifier = probe
        .program_mut(cilia_datapath::object::PROG_EMPTY)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    let link = FdLink::from(PinnedLink::from_pin(pin).unwrap());
    let id = prog.attach_to_link(link.try_into().unwrap()).unwrap();
    drop(prog.take_link(id).unwrap());
}

#[test]
fn an_agent_that_finds_another_builds_program_at_start_swaps_in_its_own() {
    privileged!("reload_at_start");
    let mut agent = TestAgent::start(AgentOptions::default());
    let (c1, c2) = (Netns::new("crl").unwrap(), Netns::new("crl").unwrap());
    agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    let id = b["id"].as_u64().unwrap();
    // The to-container program: endpoint-to-endpoint traffic is redirected
    // peer to peer and never meets it, so pings flow with the empty one.
    let pin = agent
        .bpf_root
        .path()
        .join("links")
        .join(format!("ep{id}_to"));
    let ours = link_target(&pin).unwrap();
    let our_tag = program_tag(ours.program_id).unwrap();
    agent.kill9();
    swap_in_another_builds_program(&pin);
    assert_ne!(
        program_tag(link_target(&pin).unwrap().program_id).unwrap(),
        our_tag
    );

    let mut pinger = c1
        .command("ping")
        .args(["-q", "-c", "3000", "-i", "0.002", "-W", "2", "-w", "60"])
        .arg(ip_of(&b, "ipv6").to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    agent.spawn().unwrap();
    assert!(
        pinger.try_wait().unwrap().is_none(),
        "the agent started while the pings were flowing"
    );
    let log = agent.log_text();
    assert!(log.contains("built by another cilia build"), "{log}");
    let now = link_target(&pin).unwrap();
    assert_eq!(now.link_id, ours.link_id, "the same link");
    assert_eq!(
        program_tag(now.program_id).unwrap(),
        our_tag,
        "this build's code"
    );
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) = ping_counts(&text);
    println!("ping ipv6 across the agent's start: {sent} sent, {received} received");
    assert_eq!(sent, received, "{text}");
}
