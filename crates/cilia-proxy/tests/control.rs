//! The control socket on its own, no privilege needed: only refused
//! policies are sent, so the proxy never opens its transparent listeners.

use std::path::PathBuf;
use std::time::Duration;

use cilia_policy::l7::{HttpRuleSpec, L7Policy};
use cilia_proxy::control::{FromProxy, L7Entry, ProxyEndpoint, ProxyPolicy, PROTOCOL_VERSION};
use cilia_proxy::control_client::{self, ControlClientError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), cilia_proxy::ProxyError>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(self.socket.parent().expect("dir"));
    }
}

async fn start() -> Running {
    let dir = std::env::temp_dir().join(format!(
        "cilia-proxy-control-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("proxy.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(cilia_proxy::run_until(
        cilia_proxy::Config::new(&socket),
        async {
            let _ = stopped.await;
        },
    ));
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(socket.exists(), "no control socket");
    Running {
        socket,
        stop: Some(stop),
        task,
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn bad_regex_policy() -> ProxyPolicy {
    ProxyPolicy {
        version: PROTOCOL_VERSION,
        revision: 5,
        endpoints: vec![ProxyEndpoint {
            id: 7,
            identity: 1000,
            addrs: vec!["192.0.2.7".parse().expect("addr")],
            ingress: vec![],
            egress: vec![L7Entry {
                identity: 0,
                proto: 6,
                port: 80,
                port_prefix_len: 16,
                policy: L7Policy::Http(vec![HttpRuleSpec {
                    headers: vec!["Bad Name".into()],
                    ..Default::default()
                }]),
                rules: vec![],
            }],
        }],
        prefixes: vec![],
    }
}

#[tokio::test]
async fn a_new_proxy_says_hello_without_a_revision() {
    let proxy = start().await;
    let (hello, _, _) = control_client::connect(&proxy.socket).await.expect("hello");
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert_eq!(hello.pid, std::process::id());
    assert_eq!(hello.revision, None);
}

#[tokio::test]
async fn a_refused_policy_is_answered_with_its_reason_and_nothing_is_applied() {
    let proxy = start().await;
    let (_, mut read, mut write) = control_client::connect(&proxy.socket).await.expect("hello");
    write.send_policy(&bad_regex_policy()).await.expect("send");
    let answer = tokio::time::timeout(WAIT, read.recv())
        .await
        .expect("answer")
        .expect("msg");
    let FromProxy::Rejected { revision, reason } = answer else {
        panic!("expected a rejection, got {answer:?}");
    };
    assert_eq!(revision, 5);
    assert!(
        reason.starts_with("endpoint 7 (endpoints[0]) egress[0] ")
            && reason.contains("policy.http[0].headers[0]"),
        "{reason}"
    );
    let (hello, _, _) = control_client::connect(&proxy.socket).await.expect("hello");
    assert_eq!(hello.revision, None, "nothing was applied");
}

#[tokio::test]
async fn another_protocol_version_is_rejected() {
    let proxy = start().await;
    let (_, mut read, mut write) = control_client::connect(&proxy.socket).await.expect("hello");
    let policy = ProxyPolicy {
        version: PROTOCOL_VERSION + 1,
        revision: 3,
        ..Default::default()
    };
    write.send_policy(&policy).await.expect("send");
    let answer = tokio::time::timeout(WAIT, read.recv())
        .await
        .expect("answer")
        .expect("msg");
    assert!(
        matches!(&answer, FromProxy::Rejected { revision: 3, reason } if reason.starts_with("version:")),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_line_that_is_not_a_message_is_rejected_and_the_connection_stays() {
    let proxy = start().await;
    let stream = tokio::net::UnixStream::connect(&proxy.socket)
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let hello = lines.next_line().await.expect("read").expect("hello");
    assert!(hello.starts_with(r#"{"type":"hello""#), "{hello}");
    write
        .write_all(b"{\"type\":\"launch\"}\n")
        .await
        .expect("write");
    let answer = lines.next_line().await.expect("read").expect("answer");
    let answer: FromProxy = serde_json::from_str(&answer).expect("json");
    assert!(
        matches!(&answer, FromProxy::Rejected { revision: 0, reason } if reason.starts_with("message 1:")),
        "{answer:?}"
    );
    write
        .write_all(b"\n")
        .await
        .expect("blank lines are skipped");
    let policy = serde_json::to_string(&cilia_proxy::control::ToProxy::Policy(ProxyPolicy {
        version: 99,
        revision: 4,
        ..Default::default()
    }))
    .expect("json");
    write
        .write_all(format!("{policy}\n").as_bytes())
        .await
        .expect("write");
    let answer = lines.next_line().await.expect("read").expect("answer");
    assert!(answer.contains(r#""revision":4"#), "{answer}");
}

#[tokio::test]
async fn a_second_proxy_on_a_live_socket_refuses_to_start() {
    let proxy = start().await;
    let second = cilia_proxy::run_until(cilia_proxy::Config::new(&proxy.socket), async {}).await;
    assert!(
        matches!(second, Err(cilia_proxy::ProxyError::ControlSocket { .. })),
        "{second:?}"
    );
    control_client::connect(&proxy.socket)
        .await
        .expect("the first proxy still serves");
}

#[tokio::test]
async fn stopping_the_proxy_removes_the_socket_and_refuses_new_control_connections() {
    let mut proxy = start().await;
    let _ = proxy.stop.take().expect("stop").send(());
    let ended = tokio::time::timeout(WAIT, &mut proxy.task)
        .await
        .expect("proxy stops");
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    assert!(!proxy.socket.exists());
    assert!(matches!(
        control_client::connect(&proxy.socket).await,
        Err(ControlClientError::Io(_))
    ));
}
