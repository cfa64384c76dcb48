use super::*;

const DAY: i64 = 24 * 3600;

fn enrolled(ca: &CertificateAuthority, name: &str, now: i64) -> NodeIdentity {
    let (key, csr) = new_key_and_csr(name).unwrap();
    let issued = ca
        .issue_client(&csr, name, now - 60, now + 30 * DAY)
        .unwrap();
    NodeIdentity::new(key, issued.der, ca.cert_der().to_vec()).unwrap()
}

#[test]
fn node_names_are_plain() {
    for ok in ["a", "node-1", "hospital_a.ward3", "X9"] {
        validate_node_name(ok).unwrap();
    }
    let long = "n".repeat(MAX_NODE_NAME_LEN + 1);
    for bad in [
        "",
        "-lead",
        ".hidden",
        "has space",
        "slash/",
        "ünï",
        long.as_str(),
    ] {
        assert!(validate_node_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn fingerprints_parse_in_common_spellings() {
    let ca = CertificateAuthority::generate().unwrap();
    let fp = ca.fingerprint();
    let raw = parse_fingerprint(&fp).unwrap();
    assert_eq!(hex::encode(raw), fp);
    let colons: Vec<String> = raw.iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(parse_fingerprint(&colons.join(":")).unwrap(), raw);
    assert_eq!(parse_fingerprint(&format!("sha256:{fp}")).unwrap(), raw);
    assert!(parse_fingerprint(&fp[..62]).is_err());
    assert!(parse_fingerprint("zz").is_err());
}

#[test]
fn tokens_are_random_and_stored_hashed() {
    let (t1, h1) = new_token();
    let (t2, _) = new_token();
    assert_ne!(t1, t2);
    assert_eq!(t1.len(), 2 * TOKEN_BYTES);
    assert_eq!(token_hash(&t1), h1);
    assert!(!h1.contains(&t1));
}

#[test]
fn the_ca_decides_name_usage_and_validity_not_the_csr() {
    let ca = CertificateAuthority::generate().unwrap();
    // The CSR asks for another name; the CA writes the token's name.
    let (key, csr) = new_key_and_csr("mallory").unwrap();
    let now = 1_800_000_000;
    let issued = ca.issue_client(&csr, "alice", now, now + DAY).unwrap();
    assert_eq!(issued.info.name, "alice");
    assert_eq!(issued.info.not_before, now);
    assert_eq!(issued.info.not_after, now + DAY);
    assert_eq!(issued.info.serial.len(), 32);
    let id = NodeIdentity::new(key, issued.der.clone(), ca.cert_der().to_vec()).unwrap();
    assert_eq!(id.name(), "alice");
    // Verifies as a client certificate of this CA, and not of another.
    let v = PeerVerifier::new(ca.cert_der().clone());
    assert_eq!(v.verify_cert(&issued.der, now + 10).unwrap(), "alice");
    assert!(
        v.verify_cert(&issued.der, now + 2 * DAY).is_err(),
        "expired"
    );
    let other = CertificateAuthority::generate().unwrap();
    assert!(
        PeerVerifier::new(other.cert_der().clone())
            .verify_cert(&issued.der, now + 10)
            .is_err()
    );
}

#[test]
fn a_csr_with_a_bad_signature_is_refused() {
    let ca = CertificateAuthority::generate().unwrap();
    let (_, mut csr) = new_key_and_csr("alice").unwrap();
    let last = csr.len() - 3;
    csr[last] ^= 0x55;
    assert!(matches!(
        ca.issue_client(&csr, "alice", 0, DAY),
        Err(PkiError::BadCsr(_))
    ));
    assert!(matches!(
        ca.issue_client(b"not a csr", "alice", 0, DAY),
        Err(PkiError::BadCsr(_))
    ));
}

#[test]
fn an_identity_refuses_a_certificate_for_another_key() {
    let ca = CertificateAuthority::generate().unwrap();
    let (_, csr) = new_key_and_csr("alice").unwrap();
    let issued = ca.issue_client(&csr, "alice", 0, 4_000_000_000).unwrap();
    let (other_key, _) = new_key_and_csr("alice").unwrap();
    assert!(NodeIdentity::new(other_key, issued.der, ca.cert_der().to_vec()).is_err());
}

#[test]
fn identities_round_trip_through_files_with_a_private_key_file() {
    let ca = CertificateAuthority::generate().unwrap();
    let id = enrolled(&ca, "alice", unix_now());
    let dir = std::env::temp_dir().join(format!("fedveil-pki-{}", std::process::id()));
    id.save(&dir).unwrap();
    let back = NodeIdentity::load(&dir).unwrap();
    assert_eq!(back.info(), id.info());
    assert_eq!(
        back.private_key().secret_der(),
        id.private_key().secret_der()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(NODE_IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn renewal_is_due_in_the_last_third_or_window() {
    let ca = CertificateAuthority::generate().unwrap();
    let (key, csr) = new_key_and_csr("alice").unwrap();
    let issued = ca.issue_client(&csr, "alice", 0, 30 * DAY).unwrap();
    let id = NodeIdentity::new(key, issued.der, ca.cert_der().to_vec()).unwrap();
    assert!(!id.renewal_due(19 * DAY, None));
    assert!(id.renewal_due(20 * DAY, None));
    let week = Duration::from_secs(7 * 24 * 3600);
    assert!(!id.renewal_due(22 * DAY, Some(week)));
    assert!(id.renewal_due(23 * DAY, Some(week)));
}

fn keys(id: u64) -> PeerKeys {
    PeerKeys {
        id,
        enc_pk: [id as u8; 32],
        mask_pk: [id as u8 + 1; 32],
        round_digest: [9; 32],
        attestation: None,
    }
}

#[test]
fn signed_keys_verify_and_any_change_breaks_them() {
    let ca = CertificateAuthority::generate().unwrap();
    let now = unix_now();
    let alice = NodeAttestor::new(enrolled(&ca, "alice", now));
    let bob = NodeAttestor::new(enrolled(&ca, "bob", now));
    let mut k = keys(3);
    k.attestation = Some(alice.attest(7, &k));
    assert_eq!(bob.verify(7, &k).unwrap(), "alice");
    // Another round, id or key: the signature no longer covers it.
    assert_eq!(
        bob.verify(8, &k),
        Err(AttestationError::BadSignature("alice".into()))
    );
    let mut moved = k.clone();
    moved.id = 4;
    assert!(bob.verify(7, &moved).is_err());
    let mut swapped = k.clone();
    swapped.mask_pk[0] ^= 1;
    assert!(bob.verify(7, &swapped).is_err());
    // Keys for another model: the round digest is signed too.
    let mut other_model = k.clone();
    other_model.round_digest[0] ^= 1;
    assert!(bob.verify(7, &other_model).is_err());
    // Unsigned keys, and keys signed by a node of another CA.
    assert_eq!(bob.verify(7, &keys(3)), Err(AttestationError::Unsigned));
    let stranger_ca = CertificateAuthority::generate().unwrap();
    let mallory = NodeAttestor::new(enrolled(&stranger_ca, "mallory", now));
    let mut forged = keys(3);
    forged.attestation = Some(mallory.attest(7, &forged));
    let err = bob.verify(7, &forged).unwrap_err();
    assert!(
        matches!(&err, AttestationError::Certificate(why) if why.contains("CA")),
        "{err}"
    );
}

/// The consistency check's signatures: made with the node key, checked
/// against the certificate the node's keys came with.
#[test]
fn survivor_set_signatures_verify_only_for_their_signer_and_set() {
    use fedveil_proto::secagg::survivors_message;
    let ca = CertificateAuthority::generate().unwrap();
    let now = unix_now();
    let alice = NodeAttestor::new(enrolled(&ca, "alice", now));
    let bob = NodeAttestor::new(enrolled(&ca, "bob", now));
    let cert = |a: &NodeAttestor| a.attest(1, &keys(1)).certificate;
    let set = survivors_message(4, &[1; 32], &[1, 2, 5]);
    let signature = alice.sign_survivors(&set);
    assert_eq!(
        bob.verify_survivors(&cert(&alice), &set, &signature),
        Ok(())
    );
    // Another set, round or digest; another signer's certificate; garbage.
    for other in [
        survivors_message(4, &[1; 32], &[1, 2]),
        survivors_message(5, &[1; 32], &[1, 2, 5]),
        survivors_message(4, &[2; 32], &[1, 2, 5]),
    ] {
        assert!(
            bob.verify_survivors(&cert(&alice), &other, &signature)
                .is_err()
        );
    }
    assert_eq!(
        alice.verify_survivors(&cert(&bob), &set, &signature),
        Err(AttestationError::BadSignature("bob".into()))
    );
    assert!(bob.verify_survivors(&cert(&alice), &set, &[0; 70]).is_err());
    assert!(
        bob.verify_survivors(b"not a certificate", &set, &signature)
            .is_err()
    );
}

#[test]
fn durations_parse_and_format() {
    assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
    assert_eq!(
        parse_duration("30d").unwrap(),
        Duration::from_secs(30 * 86_400)
    );
    assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    for bad in ["", "24", "h", "0h", "3y", "-1d", "1.5h"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    for d in ["30d", "36h", "2w", "90s", "45m"] {
        assert_eq!(format_duration(parse_duration(d).unwrap()), d);
    }
    for d in ["24h", "14d", "120s"] {
        let back = parse_duration(&format_duration(parse_duration(d).unwrap())).unwrap();
        assert_eq!(back, parse_duration(d).unwrap());
    }
    assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
    assert_eq!(format_time(1_800_000_000), "2027-01-15 08:00:00Z");
}

mod secagg_binding {
    use super::*;
    use fedveil_proto::secagg::client::{ClientError, SecAggClient};
    use fedveil_proto::wire::{SecAgg, SecAggParams, SecAggSetup};
    use rand::SeedableRng;

    /// Client 1's view of a round among clients 1..=4, and the keys each
    /// advertised (signed by `attestors[i]`, when given).
    fn round(attestors: &[Option<&NodeAttestor>]) -> (SecAggClient, Vec<PeerKeys>) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let n = attestors.len();
        let setup = |id: u64| SecAggSetup {
            params: SecAggParams::recommended(n, 0.0),
            neighbours: (1..=n as u64).filter(|&p| p != id).collect(),
        };
        let mut me = None;
        let mut keys = Vec::new();
        for (i, a) in attestors.iter().enumerate() {
            let id = i as u64 + 1;
            let a = a.map(|a| a as &dyn KeyAttestor);
            let (client, adv) = SecAggClient::new(id, 5, &setup(id), [5; 32], &mut rng, a).unwrap();
            let SecAgg::AdvertiseKeys { keys: k, .. } = adv else {
                unreachable!()
            };
            keys.push(k);
            if id == 1 {
                me = Some(client);
            }
        }
        (me.unwrap(), keys)
    }

    fn peers_of_1(keys: &[PeerKeys]) -> Vec<PeerKeys> {
        keys.iter().filter(|k| k.id != 1).cloned().collect()
    }

    #[test]
    fn signed_keys_of_distinct_enrolled_nodes_are_accepted() {
        let ca = CertificateAuthority::generate().unwrap();
        let now = unix_now();
        let nodes: Vec<NodeAttestor> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| NodeAttestor::new(enrolled(&ca, n, now)))
            .collect();
        let (mut me, keys) = round(&nodes.iter().map(Some).collect::<Vec<_>>());
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        me.on_peer_keys(peers_of_1(&keys), &mut rng, Some(&nodes[0]))
            .expect("all peers are enrolled and signed");
    }

    #[test]
    fn keys_the_server_made_up_are_refused() {
        let ca = CertificateAuthority::generate().unwrap();
        let now = unix_now();
        let a = NodeAttestor::new(enrolled(&ca, "a", now));
        let b = NodeAttestor::new(enrolled(&ca, "b", now));
        // A server holding no node key can only send unsigned keys, keys
        // signed under its own (other) CA, or honest keys it altered.
        let rogue_ca = CertificateAuthority::generate().unwrap();
        let rogue = NodeAttestor::new(enrolled(&rogue_ca, "c", now));
        let cases: Vec<(&str, Vec<PeerKeys>)> = {
            let (_, unsigned) = round(&[Some(&a), Some(&b), None, None]);
            let (_, foreign) = round(&[Some(&a), Some(&b), Some(&rogue), Some(&rogue)]);
            let (_, honest) = round(&[Some(&a), Some(&b), Some(&b), Some(&b)]);
            let mut altered = honest.clone();
            altered[1].mask_pk[0] ^= 1;
            // One node's keys replayed under another client id.
            let mut moved = honest.clone();
            moved[2] = moved[1].clone();
            moved[2].id = 3;
            vec![
                ("unsigned", unsigned),
                ("foreign CA", foreign),
                ("altered", altered),
                ("moved", moved),
            ]
        };
        for (what, keys) in cases {
            let (mut me, _) = round(&[Some(&a), Some(&b), Some(&b), Some(&b)]);
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            let err = me
                .on_peer_keys(peers_of_1(&keys), &mut rng, Some(&a))
                .unwrap_err();
            assert!(
                matches!(err, ClientError::BadAttestation { .. }),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn one_node_cannot_stand_in_for_several_peers_or_for_me() {
        let ca = CertificateAuthority::generate().unwrap();
        let now = unix_now();
        let a = NodeAttestor::new(enrolled(&ca, "a", now));
        let b = NodeAttestor::new(enrolled(&ca, "b", now));
        let c = NodeAttestor::new(enrolled(&ca, "c", now));
        // `b` signs two client ids (a colluding node, or a server that got
        // it to): two peers, one identity.
        let (_, keys) = round(&[Some(&a), Some(&b), Some(&b), Some(&c)]);
        let (mut me, _) = round(&[Some(&a), Some(&b), Some(&b), Some(&c)]);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let err = me
            .on_peer_keys(peers_of_1(&keys), &mut rng, Some(&a))
            .unwrap_err();
        assert!(
            matches!(err, ClientError::DuplicateIdentity { ref name } if name == "b"),
            "{err}"
        );
        // My own identity as a peer.
        let (_, keys) = round(&[Some(&a), Some(&a), Some(&b), Some(&c)]);
        let (mut me, _) = round(&[Some(&a), Some(&a), Some(&b), Some(&c)]);
        let err = me
            .on_peer_keys(peers_of_1(&keys), &mut rng, Some(&a))
            .unwrap_err();
        assert!(
            matches!(err, ClientError::DuplicateIdentity { ref name } if name == "a"),
            "{err}"
        );
    }
}

#[test]
fn the_server_certificate_has_a_san_of_the_right_type_per_name_and_ends_with_the_ca() {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let ca = CertificateAuthority::generate().unwrap();
    let names: Vec<String> = ["fl.example.org", "localhost", "203.0.113.7", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (chain, _) = ca.issue_server(&names).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        chain[1],
        *ca.cert_der(),
        "the chain ends with the CA for pinning"
    );
    let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let got: Vec<String> = san
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("dns:{d}"),
            GeneralName::IPAddress(ip) => format!("ip:{}", ip.len()),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        ["dns:fl.example.org", "dns:localhost", "ip:4", "ip:16"]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert!(ca.issue_server(&[]).is_err());
}

/// The identity a node is built from must be its CA's: a certificate of
/// another CA (or for another key) is refused, as is a key file others
/// may read.
#[test]
fn a_node_identity_is_its_cas_and_its_key_stays_private() {
    let ca = CertificateAuthority::generate().unwrap();
    let other = CertificateAuthority::generate().unwrap();
    let (key, csr) = new_key_and_csr("alice").unwrap();
    let issued = other.issue_client(&csr, "alice", 0, 30 * DAY).unwrap();
    let err = NodeIdentity::new(key, issued.der, ca.cert_der().to_vec()).unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
    // A node certificate never outlives its CA.
    let (key, csr) = new_key_and_csr("bob").unwrap();
    let forever = ca
        .issue_client(&csr, "bob", 0, i64::from(i32::MAX) * 2)
        .unwrap();
    assert_eq!(forever.info.not_after, ca.not_after().unwrap());
    let bob = NodeIdentity::new(key, forever.der, ca.cert_der().to_vec()).unwrap();
    let dir = std::env::temp_dir().join(format!("fedveil-node-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    bob.save(&dir).unwrap();
    assert!(NodeIdentity::load(&dir).is_ok());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.join(NODE_IDENTITY_FILE);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            NodeIdentity::load(&dir),
            Err(PkiError::KeyReadableByOthers { mode: 0o640, .. })
        ));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
