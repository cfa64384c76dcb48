//! Enrolment and mutual TLS over real QUIC on loopback: the full flow
//! (token, CSR, signed certificate, mTLS training with signed SecAgg keys),
//! renewal, revocation of a live node, and every rejection the server
//! makes, each seen by the node as its own actionable error.

use std::time::Duration;

use fedveil_client::enrol::{self, EnrolmentError};
use fedveil_client::{ClientError, ClientOptions, ClientReport};
use fedveil_net::pki::{self, CertificateAuthority, NodeIdentity};
use fedveil_net::quic::{self, NodeRegistry, Rejection};
use fedveil_proto::wire::ReasonCode;
use fedveil_server::Registry;
use fedveil_tests::{deploy, endpoint};

fn refused(result: Result<NodeIdentity, EnrolmentError>) -> ReasonCode {
    match result {
        Err(EnrolmentError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn rejected(result: Result<ClientReport, ClientError>) -> Rejection {
    match result {
        Err(ClientError::Rejected(r)) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_nodes_train_over_mutual_tls_with_signed_secagg_keys() {
    let d = deploy("flow", 2, 3, true);
    let mut nodes = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let id = d.enrol(&d.token(name)).await.unwrap();
        assert_eq!(id.name(), name);
        assert_eq!(pki::fingerprint(id.ca_der()), hex(&d.fingerprint));
        let ttl = id.info().not_after - id.info().not_before;
        let want = (pki::DEFAULT_CLIENT_CERT_TTL + pki::CERT_BACKDATE).as_secs() as i64;
        assert!((ttl - want).abs() <= 2, "lifetime {ttl} s");
        nodes.push(id);
    }
    let mut tasks = Vec::new();
    for (i, id) in nodes.iter().enumerate() {
        let opts = ClientOptions::enrolled(d.addr, "localhost", id).unwrap();
        assert!(opts.attestor.is_some());
        let trainer = d.trainer(i as u64);
        tasks.push(tokio::spawn(async move {
            fedveil_client::run(&endpoint(), &opts, trainer).await
        }));
    }
    for t in tasks {
        let report = t.await.unwrap().expect("an enrolled node trains");
        assert_eq!(report.server_rounds_completed, 2);
    }
    let listed = d.registry.nodes().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .all(|n| n.last_seen.is_some() && n.revoked_at.is_none())
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_enrolment_refusal_names_its_reason() {
    let d = deploy("tokens", 1, 50, false);
    // Unknown token.
    assert_eq!(
        refused(d.enrol(&"ab".repeat(32)).await),
        ReasonCode::TokenUnknown
    );
    // A token works once.
    let token = d.token("alpha");
    d.enrol(&token).await.unwrap();
    assert_eq!(refused(d.enrol(&token).await), ReasonCode::TokenUsed);
    // An expired token.
    let stale = d
        .registry
        .issue_token("late", Duration::from_secs(60), pki::unix_now() - 3600)
        .unwrap();
    assert_eq!(
        refused(d.enrol(&stale.token).await),
        ReasonCode::TokenExpired
    );
    // A name already taken (two tokens were issued for it).
    let first = d.token("beta");
    let second = d.token("beta");
    d.enrol(&first).await.unwrap();
    assert_eq!(refused(d.enrol(&second).await), ReasonCode::NameTaken);
    // A token for another name.
    let t = d.token("delta");
    let other_name = enrol::enrol(
        &endpoint(),
        d.addr,
        "localhost",
        d.fingerprint,
        &t,
        Some("epsilon"),
    )
    .await;
    assert_eq!(refused(other_name), ReasonCode::TokenNameMismatch);
    // The wrong CA fingerprint: the node refuses the server.
    let mut wrong = d.fingerprint;
    wrong[0] ^= 1;
    let err = enrol::enrol(&endpoint(), d.addr, "localhost", wrong, &t, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EnrolmentError::Rejected(Rejection::ServerUntrusted(why)) if why.contains("pinned fingerprint")),
        "{err}"
    );
    // A host that is not in the server certificate (it names only
    // localhost): said plainly, before anything is enrolled.
    let err = enrol::enrol(&endpoint(), d.addr, "127.0.0.1", d.fingerprint, &t, None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not a name in the server's certificate"),
        "{err}"
    );
    // The token survived all three failures.
    d.enrol(&t).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_anonymous_foreign_expired_revoked_and_unknown_certificates() {
    let d = deploy("mtls", 1, 50, false);
    // No client certificate at all.
    let mut anonymous = ClientOptions::new(d.addr, "localhost", "anon");
    anonymous.tls = Some(quic::client_config(&d.ca.cert_pem(), None).unwrap());
    let r = rejected(d.train(anonymous, 0).await);
    assert!(
        matches!(&r, Rejection::Refused(why) if why.contains("no client certificate")),
        "{r}"
    );
    // A certificate from another CA (the node trusts our server, though).
    let stranger = CertificateAuthority::generate().unwrap();
    let (key, csr) = pki::new_key_and_csr("mallory").unwrap();
    let now = pki::unix_now();
    let foreign = stranger
        .issue_client(&csr, "mallory", now - 60, now + 3600)
        .unwrap();
    let foreign = NodeIdentity::new(key, foreign.der, stranger.cert_der().to_vec()).unwrap();
    let mut opts = ClientOptions::new(d.addr, "localhost", "mallory");
    opts.tls = Some(quic::client_config(&d.ca.cert_pem(), Some(&foreign)).unwrap());
    assert_eq!(rejected(d.train(opts, 0).await), Rejection::UnknownCa);
    // An expired certificate, properly enrolled.
    let token = d.token("old");
    let (key, csr) = pki::new_key_and_csr("old").unwrap();
    let issued = d
        .registry
        .enrol(&token, None, now, |n| {
            d.ca.issue_client(&csr, n, now - 7200, now - 3600)
        })
        .unwrap();
    let expired = NodeIdentity::new(key, issued.der, d.ca.cert_der().to_vec()).unwrap();
    assert_eq!(rejected(d.train_as(&expired).await), Rejection::Expired);
    // A revoked node.
    let revoked = d.enrol(&d.token("gone")).await.unwrap();
    d.registry.revoke("gone", pki::unix_now()).unwrap();
    assert_eq!(rejected(d.train_as(&revoked).await), Rejection::Revoked);
    // Signed by our CA but never enrolled (e.g. a CA key used elsewhere).
    let (key, csr) = pki::new_key_and_csr("ghost").unwrap();
    let ghost =
        d.ca.issue_client(&csr, "ghost", now - 60, now + 3600)
            .unwrap();
    let ghost = NodeIdentity::new(key, ghost.der, d.ca.cert_der().to_vec()).unwrap();
    assert_eq!(rejected(d.train_as(&ghost).await), Rejection::NotInRegistry);
    // The hello must name the certificate's node.
    let honest = d.enrol(&d.token("honest")).await.unwrap();
    let mut liar = ClientOptions::enrolled(d.addr, "localhost", &honest).unwrap();
    liar.node_name = "someone-else".into();
    let err = d.train(liar, 0).await.unwrap_err();
    assert!(
        err.to_string().contains("certificate is for 'honest'"),
        "{err}"
    );
    // The server kept running through all of it.
    assert!(!d.run.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_connected_node_drops_it_at_once_and_the_run_goes_on() {
    let d = deploy("live", 1, 2, false);
    let a = d.enrol(&d.token("a")).await.unwrap();
    let b = d.enrol(&d.token("b")).await.unwrap();
    let c = d.enrol(&d.token("c")).await.unwrap();
    // `a` connects and waits for a second client.
    let opts = ClientOptions::enrolled(d.addr, "localhost", &a).unwrap();
    let trainer = d.trainer(0);
    let live = tokio::spawn(async move { fedveil_client::run(&endpoint(), &opts, trainer).await });
    while d.registry.nodes().unwrap()[0].last_seen.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another process (the operator's `fedveil-server revoke`) revokes it.
    let started = std::time::Instant::now();
    Registry::open(&d.db)
        .unwrap()
        .revoke("a", pki::unix_now())
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), live)
        .await
        .expect("the revoked node's connection is dropped while it is live");
    let r = rejected(outcome.unwrap());
    assert!(
        matches!(&r, Rejection::Refused(why) if why.contains("revoked")),
        "{r}"
    );
    let waited = started.elapsed();
    // Reconnecting fails in the handshake.
    assert_eq!(rejected(d.train_as(&a).await), Rejection::Revoked);
    // Two other nodes still complete the round.
    let (rb, rc) = tokio::join!(d.train_as(&b), d.train_as(&c));
    assert_eq!(rb.unwrap().server_rounds_completed, 1);
    assert_eq!(rc.unwrap().server_rounds_completed, 1);
    eprintln!("the revoked node was dropped after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_replaces_key_and_certificate_but_not_for_a_revoked_node() {
    let d = deploy("renew", 1, 50, false);
    let first = d.enrol(&d.token("node")).await.unwrap();
    let renewed = enrol::renew(&endpoint(), d.addr, "localhost", &first)
        .await
        .unwrap();
    assert_eq!(renewed.name(), "node");
    assert_ne!(renewed.info().serial, first.info().serial);
    assert_ne!(
        renewed.private_key().secret_der(),
        first.private_key().secret_der(),
        "renewal makes a fresh key"
    );
    assert!(renewed.info().not_after >= first.info().not_after);
    assert_eq!(d.registry.check(renewed.info()), Ok(()));
    // Renewal needs a certificate: a bare renewal request is refused.
    d.registry.revoke("node", pki::unix_now()).unwrap();
    let err = enrol::renew(&endpoint(), d.addr, "localhost", &renewed)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EnrolmentError::Rejected(Rejection::Revoked)),
        "{err}"
    );
}

/// A node whose data is not the server's kind (here the same images with
/// its classes named in another order) is refused at join with a message
/// naming both sides, and the run goes on for the nodes that match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_other_data_is_refused_naming_both_sides() {
    use std::sync::Arc;

    use fedveil_ml::data::Shard;
    use fedveil_ml::train::Trainer;
    use fedveil_proto::round::SessionError;

    let d = deploy("data-mismatch", 1, 1, false);
    let id = d.enrol(&d.token("odd")).await.unwrap();
    let mut relabelled = (*d.split.train).clone();
    relabelled.class_names = (0..relabelled.num_classes)
        .rev()
        .map(|c| format!("class-{c}"))
        .collect();
    let shard = Shard {
        data: Arc::new(relabelled),
        indices: (0..150).collect(),
    };
    let odd = Arc::new(Trainer::new("cnn", shard, burn::prelude::Device::flex(), 1).unwrap());
    let opts = ClientOptions::enrolled(d.addr, "localhost", &id).unwrap();
    let err = fedveil_client::run(&endpoint(), &opts, odd)
        .await
        .expect_err("other data is refused");
    let ClientError::Session(SessionError::Refused { code, detail }) = &err else {
        panic!("expected a refusal, got {err:?}");
    };
    assert_eq!(*code, ReasonCode::DataMismatch);
    let classes = d.split.test.num_classes;
    assert!(
        detail.contains(&format!("{classes} classes (class-{}, ", classes - 1))
            && detail.contains(&format!(
                "the server's model is for examples [1, 28, 28], {classes} classes"
            )),
        "{detail}"
    );
    // A node with the server's data trains.
    let ok = d.enrol(&d.token("even")).await.unwrap();
    let opts = ClientOptions::enrolled(d.addr, "localhost", &ok).unwrap();
    let report = fedveil_client::run(&endpoint(), &opts, d.trainer(2))
        .await
        .expect("matching data is admitted");
    assert_eq!(report.server_rounds_completed, 1);
}
