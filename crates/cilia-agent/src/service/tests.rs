//! The services subsystem against the fake datapath.

use std::sync::Arc;

use cilia_abi::{LbAlgorithm, LbBackendState};
use cilia_api::{ServiceAffinity, ServiceBackendSpec, ServiceSpec};
use cilia_datapath::fake::FakeDatapath;

use super::*;

const MAGLEV: u32 = 1021;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    dp: Arc<FakeDatapath>,
    services: Services,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(&dir.path().join("state.redb")).expect("store"));
    let dp = Arc::new(FakeDatapath::new());
    let services = Services::new(store.clone(), dp.clone(), MAGLEV);
    services.restore().expect("restore");
    Fixture {
        _dir: dir,
        store,
        dp,
        services,
    }
}

fn spec(id: Option<u16>, frontend: &str, backends: &[&str]) -> ServiceSpec {
    ServiceSpec {
        id,
        frontend: frontend.into(),
        backends: backends
            .iter()
            .map(|a| ServiceBackendSpec {
                address: (*a).into(),
                weight: None,
                state: None,
            })
            .collect(),
        algorithm: None,
        affinity: None,
        external_traffic_policy: None,
    }
}

const V6: &str = "[2001:db8::10]:80/tcp";
const B1: &str = "[2001:db8::1]:8080";
const B2: &str = "[2001:db8::2]:8080";
const B3: &str = "[2001:db8::3]:8080";

#[test]
fn a_new_service_gets_the_lowest_free_id_and_reaches_the_datapath() {
    let f = fixture();
    let s = f
        .services
        .update(&spec(None, V6, &[B1, B2]))
        .expect("create");
    assert_eq!(s.id, 1);
    assert_eq!(s.backends.len(), 2);
    assert!(s.backends.iter().all(|b| b.id != 0 && b.state == "active"));
    let rows = f.dp.lb_services().expect("services");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rev_nat, 1);
    assert_eq!(rows[0].slots.len(), 2);
    assert_eq!(f.dp.lb_backends().expect("backends").len(), 2);
    assert_eq!(f.dp.state().maglev_size, MAGLEV);
}

#[test]
fn an_update_without_id_replaces_the_service_of_its_frontend() {
    let f = fixture();
    f.services
        .update(&spec(Some(9), V6, &[B1]))
        .expect("create");
    let s = f.services.update(&spec(None, V6, &[B2])).expect("replace");
    assert_eq!(s.id, 9);
    assert_eq!(f.services.list().expect("list").len(), 1);
    let backends = f.dp.lb_backends().expect("backends");
    assert_eq!(backends.len(), 1, "B1's id is released: {backends:?}");
    assert_eq!(backends[0].addr.to_string(), B2);
}

#[test]
fn a_frontend_of_another_service_is_a_conflict() {
    let f = fixture();
    f.services
        .update(&spec(Some(1), V6, &[B1]))
        .expect("create");
    let e = f
        .services
        .update(&spec(Some(2), V6, &[B1]))
        .expect_err("conflict");
    assert!(
        matches!(e, ServiceError::FrontendInUse { other: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(V6), "{e}");
}

#[test]
fn invalid_specs_are_refused_naming_the_field() {
    let f = fixture();
    let mixed = f
        .services
        .update(&spec(None, V6, &[B1, "192.0.2.1:80"]))
        .expect_err("mixed families");
    assert!(
        matches!(&mixed, ServiceError::Invalid(e) if e.field() == "backends"),
        "{mixed}"
    );
    assert!(mixed.to_string().contains("192.0.2.1:80"), "{mixed}");
    let mut bad_state = spec(None, V6, &[B1]);
    bad_state.backends[0].state = Some("draining".into());
    let e = f.services.update(&bad_state).expect_err("state");
    assert!(
        matches!(&e, ServiceError::Invalid(l) if l.field() == "backends[0].state"),
        "{e}"
    );
    let e = f
        .services
        .update(&spec(Some(0), V6, &[B1]))
        .expect_err("id 0");
    assert!(
        matches!(&e, ServiceError::Invalid(l) if l.field() == "id"),
        "{e}"
    );
    assert!(f.dp.lb_services().expect("services").is_empty());
    assert!(f.services.list().expect("list").is_empty());
}

#[test]
fn terminating_backends_stay_in_the_backends_map_but_leave_the_slots() {
    let f = fixture();
    let mut s = spec(Some(3), V6, &[B1, B2, B3]);
    s.backends[1].state = Some("terminating".into());
    s.backends[2].state = Some("quarantined".into());
    let view = f.services.update(&s).expect("create");
    let rows = f.dp.lb_services().expect("services");
    assert_eq!(rows[0].slots, vec![view.backends[0].id]);
    let states: Vec<LbBackendState> =
        f.dp.lb_backends()
            .expect("backends")
            .iter()
            .map(|b| b.state)
            .collect();
    assert!(states.contains(&LbBackendState::Terminating));
    assert!(states.contains(&LbBackendState::Quarantined));
}

#[test]
fn a_maglev_service_gets_a_table_of_the_configured_size_with_weights() {
    let f = fixture();
    let mut s = spec(Some(4), V6, &[B1, B2]);
    s.algorithm = Some("maglev".into());
    s.backends[0].weight = Some(1);
    s.backends[1].weight = Some(3);
    s.affinity = Some(ServiceAffinity {
        timeout_secs: 10_800,
    });
    let view = f.services.update(&s).expect("create");
    let row = &f.dp.lb_services().expect("services")[0];
    assert_eq!(row.algorithm, LbAlgorithm::Maglev);
    assert_eq!(row.affinity_timeout, Some(10_800));
    let table = row.maglev.as_ref().expect("table");
    assert_eq!(table.len(), MAGLEV as usize);
    let heavy = table
        .iter()
        .filter(|id| **id == view.backends[1].id)
        .count();
    assert!((740..=790).contains(&heavy), "{heavy} of {MAGLEV}");
    let lb = f.services.kernel_view().expect("kernel view");
    assert_eq!(lb.maglev_table_size, MAGLEV);
    let shares = lb.services[0].maglev.as_ref().expect("shares");
    assert_eq!(shares.iter().map(|s| s.entries).sum::<u32>(), MAGLEV);
}

#[test]
fn deleting_a_service_keeps_backends_another_service_uses() {
    let f = fixture();
    f.services
        .update(&spec(Some(1), V6, &[B1, B2]))
        .expect("one");
    f.services
        .update(&spec(Some(2), "[2001:db8::11]:80/tcp", &[B2, B3]))
        .expect("two");
    assert_eq!(f.dp.lb_backends().expect("backends").len(), 3);
    f.services.delete(1).expect("delete");
    let left: Vec<String> =
        f.dp.lb_backends()
            .expect("backends")
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
    assert_eq!(left, vec![B2.to_string(), B3.to_string()]);
    assert_eq!(f.dp.lb_services().expect("services").len(), 1);
    assert!(matches!(
        f.services.delete(1),
        Err(ServiceError::NotFound(1))
    ));
    assert!(matches!(f.services.get(1), Err(ServiceError::NotFound(1))));
}

#[test]
fn a_changed_frontend_removes_the_old_rows() {
    let f = fixture();
    f.services
        .update(&spec(Some(5), V6, &[B1]))
        .expect("create");
    f.services
        .update(&spec(Some(5), "[2001:db8::12]:443/tcp", &[B1]))
        .expect("move");
    let rows = f.dp.lb_services().expect("services");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].frontend.port, 443);
}

#[test]
fn restore_rewrites_stored_services_and_drops_what_the_store_lacks() {
    let f = fixture();
    let s = f
        .services
        .update(&spec(Some(6), "192.0.2.10:53/udp", &["10.0.0.1:53"]))
        .expect("create");
    // A fresh kernel (maps lost) plus a leftover service and backend.
    {
        let mut st = f.dp.state();
        st.lb_services.clear();
        st.lb_backends.clear();
        st.lb_revnat.clear();
        st.lb_maglev.clear();
        st.maglev_size = 0;
    }
    f.dp.upsert_lb_backends(&[cilia_abi::LbBackend {
        id: 999,
        addr: "10.9.9.9:53".parse().expect("addr"),
        state: LbBackendState::Active,
    }])
    .expect("leftover backend");
    // A leftover of the stored service's id under another frontend, and a
    // leftover service of its own.
    f.dp.upsert_lb_service(&cilia_abi::LbService {
        rev_nat: 6,
        frontend: cilia_abi::LbFrontend {
            addr: "192.0.2.98".parse().expect("addr"),
            port: 53,
            proto: 17,
        },
        algorithm: LbAlgorithm::Random,
        affinity_timeout: None,
        slots: vec![999],
        maglev: None,
        flags: Default::default(),
    })
    .expect("leftover of id 6");
    f.dp.upsert_lb_service(&cilia_abi::LbService {
        rev_nat: 77,
        frontend: cilia_abi::LbFrontend {
            addr: "192.0.2.99".parse().expect("addr"),
            port: 53,
            proto: 17,
        },
        algorithm: LbAlgorithm::Random,
        affinity_timeout: None,
        slots: vec![999],
        maglev: None,
        flags: Default::default(),
    })
    .expect("leftover service");
    let restarted = Services::new(f.store.clone(), f.dp.clone(), MAGLEV);
    assert_eq!(restarted.restore().expect("restore"), 1);
    let rows = f.dp.lb_services().expect("services");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rev_nat, 6);
    assert_eq!(rows[0].slots, vec![s.backends[0].id]);
    let ids: Vec<u32> =
        f.dp.lb_backends()
            .expect("b")
            .iter()
            .map(|b| b.id)
            .collect();
    assert_eq!(ids, vec![s.backends[0].id]);
    assert_eq!(f.dp.state().maglev_size, MAGLEV);
}

#[test]
fn a_datapath_failure_is_reported_and_the_next_update_heals_it() {
    let f = fixture();
    f.dp.fail_next("upsert_lb_service", 1);
    let e = f
        .services
        .update(&spec(Some(8), V6, &[B1]))
        .expect_err("injected");
    assert!(matches!(e, ServiceError::Datapath { id: 8, .. }), "{e}");
    assert_eq!(f.services.list().expect("list").len(), 1, "stored");
    f.services.update(&spec(Some(8), V6, &[B1])).expect("again");
    assert_eq!(f.dp.lb_services().expect("services").len(), 1);
}

const V4: &str = "192.0.2.10:80/tcp";
const V4B: &str = "192.0.2.11:80/tcp";

fn v4(n: u16) -> String {
    format!("192.0.2.{}:{}/tcp", n % 250 + 1, 1000 + n / 250)
}

#[test]
fn an_import_creates_all_entries_in_order_with_the_lowest_free_ids() {
    let f = fixture();
    f.services
        .update(&spec(Some(2), V4, &["10.0.0.1:80"]))
        .expect("create");
    let r = f
        .services
        .import(
            &[
                spec(None, V6, &[B1]),
                spec(None, V4, &["10.0.0.2:80"]),
                spec(Some(9), V4B, &["10.0.0.1:80"]),
                spec(None, "192.0.2.12:80/tcp", &["10.0.0.1:80"]),
            ],
            false,
        )
        .expect("import");
    // V6: lowest free; V4: its stored service's id; then the given id;
    // then the next free one.
    assert_eq!(r.ids, vec![1, 2, 9, 3]);
    assert_eq!((r.created, r.updated, r.unchanged), (3, 1, 0));
    assert!(r.deleted.is_empty());
    assert_eq!(f.services.list().expect("list").len(), 4);
    assert_eq!(f.dp.lb_services().expect("services").len(), 4);
    // Shared backend addresses have one id.
    assert_eq!(f.dp.lb_backends().expect("backends").len(), 3);
    let again = f
        .services
        .import(&[spec(None, V6, &[B1])], false)
        .expect("again");
    assert_eq!((again.ids, again.unchanged), (vec![1], 1));
}

#[test]
fn a_refused_entry_applies_nothing_and_every_refusal_names_index_and_field() {
    let f = fixture();
    f.services
        .update(&spec(Some(5), V4, &["10.0.0.1:80"]))
        .expect("create");
    let before = f.services.list().expect("list");
    let mut bad_state = spec(None, "192.0.2.20:80/tcp", &["10.0.0.1:80"]);
    bad_state.backends[0].state = Some("gone".into());
    let e = f
        .services
        .import(
            &[
                spec(None, V6, &[B1]),                  // fine
                spec(Some(6), V4, &["10.0.0.2:80"]),    // frontend of service 5
                spec(None, "192.0.2.10:80", &[]),       // no protocol
                bad_state,                              // backends[0].state
                spec(Some(7), V6, &[B2]),               // V6 twice in the import
                spec(None, V4B, &["[2001:db8::1]:80"]), // other family
            ],
            false,
        )
        .expect_err("refused");
    let ServiceError::Refused { total, errors } = &e else {
        panic!("{e}")
    };
    assert_eq!(*total, 6);
    let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.index, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (1, "frontend"),
            (2, "frontend"),
            (3, "backends[0].state"),
            (4, "frontend"),
            (5, "backends"),
        ]
    );
    let msg = e.to_string();
    assert!(
        msg.contains("5 of 6 entries refused, nothing applied"),
        "{msg}"
    );
    assert!(
        msg.contains("services[1].frontend: 192.0.2.10:80/tcp is already used by service 5"),
        "{msg}"
    );
    assert!(
        msg.contains("services[4].frontend: [2001:db8::10]:80/tcp is also given by services[0]"),
        "{msg}"
    );
    assert_eq!(f.services.list().expect("list"), before, "store unchanged");
    assert_eq!(
        f.dp.lb_services().expect("services").len(),
        1,
        "datapath unchanged"
    );
}

#[test]
fn an_import_with_prune_makes_the_list_the_whole_set() {
    let f = fixture();
    for n in 1..=5u16 {
        f.services
            .update(&spec(Some(n), &v4(n), &[&format!("10.0.1.{n}:80")]))
            .expect("create");
    }
    let r = f
        .services
        .import(
            &[
                spec(Some(2), &v4(2), &["10.0.1.2:80"]),
                // Service 4's frontend moves to a new service, 4 is pruned.
                spec(Some(40), &v4(4), &["10.0.1.4:80"]),
            ],
            true,
        )
        .expect("import");
    assert_eq!(r.ids, vec![2, 40]);
    assert_eq!(r.deleted, vec![1, 3, 4, 5]);
    assert_eq!((r.created, r.unchanged), (1, 1));
    let ids: Vec<u16> = f
        .services
        .list()
        .expect("list")
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, vec![2, 40]);
    let rows = f.dp.lb_services().expect("services");
    let kernel: Vec<u16> = rows.iter().map(|r| r.rev_nat).collect();
    assert_eq!(kernel, vec![2, 40]);
    assert_eq!(f.dp.lb_backends().expect("backends").len(), 2, "released");
}

#[test]
fn an_import_may_swap_the_frontends_of_two_services() {
    let f = fixture();
    f.services
        .update(&spec(Some(1), V4, &["10.0.0.1:80"]))
        .expect("1");
    f.services
        .update(&spec(Some(2), V4B, &["10.0.0.2:80"]))
        .expect("2");
    f.services
        .import(
            &[
                spec(Some(1), V4B, &["10.0.0.1:80"]),
                spec(Some(2), V4, &["10.0.0.2:80"]),
            ],
            false,
        )
        .expect("swap");
    let rows = f.dp.lb_services().expect("services");
    assert_eq!(rows.len(), 2);
    for row in rows {
        let want = if row.rev_nat == 1 { V4B } else { V4 };
        let stored = f.services.get(row.rev_nat).expect("stored");
        assert_eq!(stored.frontend, want);
        assert_eq!(
            row.frontend,
            cilia_lb::rows::frontend_row(
                &parse_spec(&spec(Some(row.rev_nat), want, &[])).expect("spec")
            )
        );
    }
}

#[test]
fn thousands_of_services_import_in_one_store_commit() {
    let f = fixture();
    let specs: Vec<ServiceSpec> = (1..=3000u16)
        .map(|n| spec(None, &v4(n), &["10.0.0.1:80"]))
        .collect();
    let revision = f.store.kv_revision().expect("revision");
    let r = f.services.import(&specs, false).expect("import");
    assert_eq!(r.created, 3000);
    assert_eq!(f.store.kv_revision().expect("revision"), revision + 1);
    assert_eq!(f.dp.lb_services().expect("services").len(), 3000);
}
