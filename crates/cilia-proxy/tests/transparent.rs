//! The proxy between real client and server namespaces, made transparent by
//! nftables TPROXY in the node namespace (see `common`): the Star Wars
//! requests, keep-alive, streaming, policy updates and flow records.

mod common;

use std::time::{Duration, Instant};

use cilia_proxy::control::{FromProxy, L7Direction, L7Verdict};
use cilia_testnet::privileged;
use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listener_and_no_connection_before_the_first_policy() {
    privileged!("no_listener_before_policy");
    let topo = Topology::new().await;
    let (mut control, hello) = topo.control().await;
    assert!(
        matches!(
            hello,
            FromProxy::Hello {
                version: 1,
                revision: None,
                ..
            }
        ),
        "{hello:?}"
    );
    assert!(!node_listens(&topo.node, PROXY_PORT));
    let refused = topo.connect(server4(80)).await;
    assert!(refused.is_err(), "a redirected flow must find no proxy");

    let answer = control.apply(&policy(1, deathstar_rules())).await;
    assert_eq!(answer, FromProxy::Applied { revision: 1 });
    wait_listening(&topo).await;
    let mut client = topo.http(server4(80)).await;
    let a = client.request("POST", "/v1/request-landing", &[]).await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_post_is_forwarded_and_the_ship_lands() {
    privileged!("allowed_post_forwarded");
    let (topo, _control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    let a = client.request("POST", "/v1/request-landing", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "Ship landed\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_put_is_answered_403_access_denied() {
    privileged!("denied_put_403");
    let (topo, _control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    let a = client.request("PUT", "/v1/exhaust-port", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (403, "Access denied\r\n"));
    assert_eq!(a.headers["content-type"], "text/plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_regex_must_match_the_whole_path() {
    privileged!("path_regex_anchored");
    let (topo, _control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    for (path, status) in [
        ("/v1/status", 200),
        ("/v1/status/x", 403),
        ("/x/v1/status", 403),
        ("/v1/status?all=1", 403),
        ("/v1/statu", 403),
    ] {
        let a = client.request("GET", path, &[]).await;
        assert_eq!(a.status, status, "GET {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rule_needs_the_header_with_its_value() {
    privileged!("header_rule");
    let (topo, _control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    let a = client.request("GET", "/v1/secret", &[]).await;
    assert_eq!(a.status, 403);
    let a = client
        .request("GET", "/v1/secret", &[("x-has-force", "false")])
        .await;
    assert_eq!(a.status, 403);
    let a = client
        .request("GET", "/v1/secret", &[("X-Has-Force", "true")])
        .await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_mixes_allowed_and_denied_requests_over_one_upstream() {
    privileged!("keep_alive_mix");
    let (topo, _control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    let first = client.request("POST", "/v1/request-landing", &[]).await;
    assert_eq!(first.status, 200);
    for _ in 0..3 {
        let denied = client
            .request_body("PUT", "/v1/exhaust-port", &[], "torpedo")
            .await;
        assert_eq!(denied.status, 403);
        let allowed = client.request("GET", "/v1/status", &[]).await;
        assert_eq!(allowed.status, 200);
        assert_eq!(
            allowed.peer(),
            first.peer(),
            "every allowed request goes over the same upstream connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sees_the_client_address_as_peer_over_ipv4_and_ipv6() {
    privileged!("server_sees_client_address");
    let (topo, _control) = with_policy().await;
    for (dst, client_ip) in [(server4(80), CLIENT4), (server6(80), CLIENT6)] {
        let mut client = topo.http(dst).await;
        let a = client.request("POST", "/v1/request-landing", &[]).await;
        assert_eq!(a.status, 200, "{dst}");
        assert_eq!(a.peer().ip(), ip(client_ip), "{dst}");
        assert_ne!(
            a.peer().port(),
            client.local.port(),
            "the upstream port never mirrors the client's"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_bounded_proxy_memory() {
    privileged!("large_body_streaming");
    let (topo, _control) = with_policy().await;
    const LEN: u64 = 64 << 20;
    let mut client = topo.http(server4(80)).await;
    // Warm up (first connection, allocator arenas), then take the baseline.
    assert_eq!(client.request("GET", "/v1/status", &[]).await.status, 200);
    let before = topo.proxy().status_kib("VmRSS");
    let req = Request::builder()
        .method("POST")
        .uri("/echo")
        .body(BodyExt::boxed(Zeros { left: LEN }))
        .expect("request");
    let resp = client.send(req).await.expect("echo response head");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("echo data keeps flowing")
    {
        if let Some(data) = frame.expect("echo frame").data_ref() {
            got += data.len() as u64;
        }
        assert!(Instant::now() < deadline, "64 MiB echo too slow");
    }
    assert_eq!(got, LEN);
    let peak = topo.proxy().status_kib("VmHWM");
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!("proxy RSS before {before} KiB, peak {peak} KiB");
    assert!(
        growth_mib < 32,
        "proxy peak RSS grew by {growth_mib} MiB for a 64 MiB body each way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_headers_does_not_block_another() {
    privileged!("slow_client");
    let (topo, _control) = with_policy().await;
    let mut slow = topo.connect(server4(80)).await.expect("slow connect");
    let head = b"GET /v1/status HTTP/1.1\r\nHost: deathstar\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    // One byte every 50 ms: about 3.5 s for the whole head.
    let trickle = tokio::spawn(async move {
        for b in head {
            slow.write_all(&[*b]).await.expect("slow write");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slow
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fast = topo.http(server4(80)).await;
    for _ in 0..5 {
        let a = fast.request("POST", "/v1/request-landing", &[]).await;
        assert_eq!(a.status, 200);
    }
    assert!(
        !trickle.is_finished(),
        "the fast client's requests were answered while the slow head was still arriving"
    );
    let mut slow = trickle.await.expect("trickle task");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains("ok GET /v1/status") {
        assert!(
            Instant::now() < deadline,
            "slow client got no answer: {got:?}"
        );
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .expect("slow answer in time")
            .expect("slow read");
        assert!(
            n > 0,
            "connection closed: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_update_applies_to_the_next_request_of_an_open_connection() {
    privileged!("policy_update_keep_alive");
    let (topo, mut control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    let before = client.request("GET", "/v1/status", &[]).await;
    assert_eq!(before.status, 200);

    let answer = control
        .apply(&policy(2, vec![rule("POST", "/v1/request-landing")]))
        .await;
    assert_eq!(answer, FromProxy::Applied { revision: 2 });

    let denied = client.request("GET", "/v1/status", &[]).await;
    assert_eq!(
        denied.status, 403,
        "the new policy decides the next request"
    );
    let landed = client.request("POST", "/v1/request-landing", &[]).await;
    assert_eq!(landed.status, 200, "the connection survived the update");
    assert_eq!(landed.peer(), before.peer(), "and so did its upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_policy_names_the_entry_and_keeps_the_previous_one() {
    privileged!("rejected_policy");
    let (topo, mut control) = with_policy().await;
    let answer = control.apply(&policy(2, vec![rule("GET", "/v1/(")])).await;
    let FromProxy::Rejected { revision, reason } = answer else {
        panic!("expected a rejection, got {answer:?}");
    };
    assert_eq!(revision, 2);
    assert!(
        reason.starts_with("endpoint 1 (endpoints[0]) ingress[0]")
            && reason.contains("http[0].path"),
        "{reason}"
    );
    let mut bad_version = policy(3, deathstar_rules());
    bad_version.version = 2;
    assert!(matches!(
        control.apply(&bad_version).await,
        FromProxy::Rejected { revision: 3, .. }
    ));
    let mut client = topo.http(server4(80)).await;
    let a = client.request("POST", "/v1/request-landing", &[]).await;
    assert_eq!(a.status, 200, "revision 1 is still in force");
    let (_again, hello) = topo.control().await;
    assert!(
        matches!(
            hello,
            FromProxy::Hello {
                revision: Some(1),
                ..
            }
        ),
        "{hello:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_stays_in_force_when_the_agent_disconnects() {
    privileged!("policy_survives_agent");
    let (topo, control) = with_policy().await;
    drop(control);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut client = topo.http(server4(80)).await;
    assert_eq!(
        client
            .request("POST", "/v1/request-landing", &[])
            .await
            .status,
        200
    );
    assert_eq!(
        client.request("PUT", "/v1/exhaust-port", &[]).await.status,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_reported_as_a_flow_record() {
    privileged!("flow_records");
    let (topo, mut control) = with_policy().await;
    let (mut other, _) = topo.control().await;
    let mut client = topo.http(server4(80)).await;
    client.request("POST", "/v1/request-landing", &[]).await;
    client.request("PUT", "/v1/exhaust-port", &[]).await;

    let landed = control.next_flow().await;
    assert_eq!(
        landed,
        other.next_flow().await,
        "every control client gets it"
    );
    assert_eq!(landed.method, "POST");
    assert_eq!(landed.path, "/v1/request-landing");
    assert_eq!(landed.host.as_deref(), Some("deathstar.empire.svc"));
    assert_eq!((landed.status, landed.verdict), (200, L7Verdict::Forwarded));
    assert_eq!(
        (landed.endpoint_id, landed.direction),
        (SERVER_ID, L7Direction::Ingress)
    );
    assert_eq!(
        (landed.src_identity, landed.dst_identity),
        (CLIENT_IDENTITY, SERVER_IDENTITY)
    );
    assert_eq!(landed.src, client.local);
    assert_eq!(landed.dst, server4(80));
    assert_eq!(landed.rules, vec![RULE.to_string()]);
    assert!(landed.time_unix_ns > 0);

    let denied = control.next_flow().await;
    assert_eq!(denied.method, "PUT");
    assert_eq!(denied.path, "/v1/exhaust-port");
    assert_eq!((denied.status, denied.verdict), (403, L7Verdict::Denied));
    assert_eq!(denied.rules, vec![RULE.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_path_is_reported_cut_to_256_bytes() {
    privileged!("flow_path_truncated");
    let (topo, mut control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    let path = format!("/{}", "a".repeat(1000));
    assert_eq!(client.request("GET", &path, &[]).await.status, 403);
    let flow = control.next_flow().await;
    assert_eq!(flow.path.len(), cilia_proxy::MAX_FLOW_PATH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_answered_503() {
    privileged!("upstream_503");
    let (topo, mut control) = with_policy().await;
    // Port 81 is redirected and allowed, but nothing listens on it.
    let mut client = topo.http(server4(81)).await;
    let a = client.request("POST", "/v1/request-landing", &[]).await;
    assert_eq!(a.status, 503);
    let flow = control.next_flow().await;
    assert_eq!((flow.status, flow.verdict), (503, L7Verdict::Error));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_to_a_non_endpoint_leaves_from_the_node_address() {
    privileged!("egress_from_node");
    let topo = Topology::new().await;
    let (mut control, _) = topo.control().await;
    // The server is not a local endpoint here: the client's egress decides.
    let mut p = policy(1, vec![]);
    p.endpoints.remove(0);
    p.endpoints[0].egress = vec![cilia_proxy::control::L7Entry {
        identity: 0,
        proto: 6,
        port: 80,
        port_prefix_len: 16,
        policy: cilia_policy::l7::L7Policy::Http(vec![rule("GET", "/v1/.*")]),
        rules: vec!["egress-rule".into()],
    }];
    assert_eq!(control.apply(&p).await, FromProxy::Applied { revision: 1 });
    wait_listening(&topo).await;
    let mut client = topo.http(server4(80)).await;
    let a = client.request("GET", "/v1/status", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.peer().ip(), ip(NODE_TO_SERVER4));
    assert_eq!(client.request("POST", "/v1/status", &[]).await.status, 403);
    let flow = control.next_flow().await;
    assert_eq!(
        (flow.endpoint_id, flow.direction, flow.dst_identity),
        (CLIENT_ID, L7Direction::Egress, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_listeners_and_exits() {
    privileged!("sigterm_exit");
    let (mut topo, _control) = with_policy().await;
    let mut client = topo.http(server4(80)).await;
    assert_eq!(client.request("GET", "/v1/status", &[]).await.status, 200);
    let pid = nix::unistd::Pid::from_raw(topo.proxy().pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = topo.proxy_mut().child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "proxy still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(!topo.proxy().socket.exists(), "control socket removed");
    assert!(!node_listens(&topo.node, PROXY_PORT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_replaces_a_stale_file_and_is_private() {
    privileged!("control_socket_mode");
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let topo = Topology::without_proxy().await;
    let path = topo.dir().join("stale.sock");
    std::fs::write(&path, "left over by a crashed proxy").expect("stale file");
    let proxy = InProcess::start_replacing(&topo.node, cilia_proxy::Config::new(&path));
    let meta = std::fs::metadata(&path).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let control = ControlClient::connect(&path).await;
    assert!(matches!(
        control.hello,
        FromProxy::Hello { revision: None, .. }
    ));
    proxy.stop().expect("clean stop");
    assert!(!path.exists(), "removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_mid_response_closes_the_client_connection() {
    privileged!("upstream_reset_mid_response");
    let (topo, _control) = with_policy().await;
    // Port 82 answers 7 of 1000 promised bytes, then resets.
    let mut client = topo.http(server4(82)).await;
    let resp = client
        .send(
            Request::builder()
                .method("POST")
                .uri("/v1/request-landing")
                .body(empty())
                .expect("request"),
        )
        .await
        .expect("response head");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body ends in time");
    assert!(body.is_err(), "a cut response must not look complete");
    let next = client
        .send(
            Request::builder()
                .uri("/v1/status")
                .body(empty())
                .expect("request"),
        )
        .await;
    assert!(next.is_err(), "the client connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_client_that_never_reads_loses_flow_records_not_requests() {
    privileged!("slow_control_client");
    let topo = Topology::without_proxy().await;
    let mut config = cilia_proxy::Config::new(topo.dir().join("inproc.sock"));
    config.port = PROXY_PORT;
    config.flow_queue = 4;
    let proxy = InProcess::start(&topo.node, config);
    let mut stalled = ControlClient::connect(&proxy.socket).await;
    let answer = stalled.apply(&policy(1, deathstar_rules())).await;
    assert_eq!(answer, FromProxy::Applied { revision: 1 });
    wait_listening(&topo).await;

    // The stalled client reads nothing more while requests go on.
    const N: usize = 2000;
    let mut client = topo.http(server4(80)).await;
    let t = Instant::now();
    for i in 0..N {
        let path = if i % 2 == 0 {
            "/v1/status"
        } else {
            "/v1/exhaust-port"
        };
        let a = client.request("GET", path, &[]).await;
        assert!(
            a.status == 200 || a.status == 403,
            "request {i}: {}",
            a.status
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "requests slowed down: {:?}",
        t.elapsed()
    );
    // It now finds fewer records than requests: the overflow was dropped.
    let mut flows = 0;
    while let Ok(line) = tokio::time::timeout(Duration::from_millis(500), stalled.recv()).await {
        if matches!(line, FromProxy::Flow(_)) {
            flows += 1;
        }
        assert!(flows <= N);
    }
    assert!(
        flows < N,
        "{flows} records for {N} requests: nothing was dropped?"
    );
    drop(stalled);
    proxy.stop().expect("in-process proxy ends cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_request_in_flight_finish_and_stops_accepting() {
    privileged!("graceful_shutdown");
    let topo = Topology::without_proxy().await;
    let mut config = cilia_proxy::Config::new(topo.dir().join("inproc.sock"));
    config.port = PROXY_PORT;
    let proxy = InProcess::start(&topo.node, config);
    let mut control = ControlClient::connect(&proxy.socket).await;
    let answer = control.apply(&policy(1, deathstar_rules())).await;
    assert_eq!(answer, FromProxy::Applied { revision: 1 });
    wait_listening(&topo).await;

    let mut client = topo.http(server4(80)).await;
    let in_flight = tokio::spawn(async move { client.request("GET", "/slow", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || proxy.stop());
    let answer = in_flight.await.expect("request task");
    assert_eq!((answer.status, answer.body.as_str()), (200, "slow ok\n"));
    stopped
        .await
        .expect("stop task")
        .expect("the proxy ends cleanly");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        topo.connect(server4(80)).await.is_err(),
        "no listener after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_with_a_large_body_is_answered_and_the_connection_closed() {
    privileged!("denied_large_body");
    let (topo, _control) = with_policy().await;
    let mut stream = topo.connect(server4(80)).await.expect("connect");
    stream
        .write_all(b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: deathstar\r\ncontent-length: 1048576\r\n\r\ntorpedo")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..100 {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answer in time")
            .unwrap_or(0);
        if n == 0 {
            break; // closed: the unread body cannot be skipped
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 403"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.ends_with("access denied\r\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_connection_cap_is_refused_and_others_are_served() {
    privileged!("connection_cap");
    let topo = Topology::without_proxy().await;
    let mut config = cilia_proxy::Config::new(topo.dir().join("inproc.sock"));
    config.port = PROXY_PORT;
    config.max_connections_per_client = 2;
    let proxy = InProcess::start(&topo.node, config);
    let mut control = ControlClient::connect(&proxy.socket).await;
    let answer = control.apply(&policy(1, deathstar_rules())).await;
    assert_eq!(answer, FromProxy::Applied { revision: 1 });
    wait_listening(&topo).await;

    let mut first = topo.http(server4(80)).await;
    let mut second = topo.http(server4(80)).await;
    assert_eq!(first.request("GET", "/v1/status", &[]).await.status, 200);
    assert_eq!(second.request("GET", "/v1/status", &[]).await.status, 200);
    // A third connection of the same client is closed at once: its request
    // gets no answer.
    let mut third = topo.http(server4(80)).await;
    let refused = third
        .send(
            Request::builder()
                .method("GET")
                .uri("/v1/status")
                .header("host", "deathstar")
                .body(empty())
                .expect("request"),
        )
        .await;
    assert!(
        refused.is_err(),
        "the third connection was served: {refused:?}"
    );
    // Closing one gives the slot back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = topo.http(server4(80)).await;
        let answer = again
            .send(
                Request::builder()
                    .method("GET")
                    .uri("/v1/status")
                    .header("host", "deathstar")
                    .body(empty())
                    .expect("request"),
            )
            .await;
        if answer.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(second.request("GET", "/v1/status", &[]).await.status, 200);
    drop(control);
    proxy.stop().expect("in-process proxy ends cleanly");
}
