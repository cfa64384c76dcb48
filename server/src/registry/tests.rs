use super::*;
use fedveil_net::pki::CertificateAuthority;

const DAY: i64 = 86_400;
const NOW: i64 = 1_800_000_000;

fn temp_db(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-registry-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("state.db")
}

fn sign<'a>(
    ca: &'a CertificateAuthority,
    csr: &'a [u8],
) -> impl FnOnce(&str) -> Result<IssuedCert, PkiError> + 'a {
    move |name| ca.issue_client(csr, name, NOW - 60, NOW + 30 * DAY)
}

fn enrol(reg: &Registry, ca: &CertificateAuthority, name: &str) -> IssuedCert {
    let token = reg
        .issue_token(name, Duration::from_secs(3600), NOW)
        .unwrap()
        .token;
    let (_, csr) = pki::new_key_and_csr(name).unwrap();
    reg.enrol(&token, None, NOW, sign(ca, &csr)).unwrap()
}

#[test]
fn a_token_enrols_its_node_once() {
    let reg = Registry::in_memory().unwrap();
    let ca = CertificateAuthority::generate().unwrap();
    let token = reg
        .issue_token("alpha", Duration::from_secs(3600), NOW)
        .unwrap()
        .token;
    let (_, csr) = pki::new_key_and_csr("alpha").unwrap();
    let issued = reg.enrol(&token, None, NOW + 5, sign(&ca, &csr)).unwrap();
    assert_eq!(issued.info.name, "alpha");
    assert_eq!(reg.check(&issued.info), Ok(()));
    assert!(matches!(
        reg.enrol(&token, None, NOW + 6, sign(&ca, &csr)),
        Err(EnrolError::TokenUsed)
    ));
    let nodes = reg.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        nodes[0].serial.as_deref(),
        Some(issued.info.serial.as_str())
    );
    assert_eq!(nodes[0].last_seen, None);
    reg.touch("alpha", NOW + 100).unwrap();
    assert_eq!(reg.nodes().unwrap()[0].last_seen, Some(NOW + 100));
}

#[test]
fn tokens_are_refused_when_unknown_expired_misnamed_or_the_name_is_taken() {
    let reg = Registry::in_memory().unwrap();
    let ca = CertificateAuthority::generate().unwrap();
    let (_, csr) = pki::new_key_and_csr("x").unwrap();
    assert!(matches!(
        reg.enrol("00ff", None, NOW, sign(&ca, &csr)),
        Err(EnrolError::TokenUnknown)
    ));
    let short = reg
        .issue_token("beta", Duration::from_secs(60), NOW)
        .unwrap();
    assert!(matches!(
        reg.enrol(&short.token, None, NOW + 60, sign(&ca, &csr)),
        Err(EnrolError::TokenExpired)
    ));
    let t = reg
        .issue_token("gamma", Duration::from_secs(60), NOW)
        .unwrap();
    assert!(matches!(
        reg.enrol(&t.token, Some("delta"), NOW, sign(&ca, &csr)),
        Err(EnrolError::TokenNameMismatch { .. })
    ));
    // Two tokens for one name: the second cannot enrol a second node.
    let first = reg
        .issue_token("gamma", Duration::from_secs(60), NOW)
        .unwrap();
    reg.enrol(&first.token, None, NOW, sign(&ca, &csr)).unwrap();
    assert!(matches!(
        reg.enrol(&t.token, None, NOW, sign(&ca, &csr)),
        Err(EnrolError::NameTaken(_))
    ));
    // And the operator cannot issue a token for a live name.
    assert!(matches!(
        reg.issue_token("gamma", Duration::from_secs(60), NOW),
        Err(EnrolError::NameTaken(_))
    ));
    assert!(matches!(
        reg.issue_token("bad name", Duration::from_secs(60), NOW),
        Err(EnrolError::Pki(PkiError::BadName(_)))
    ));
}

#[test]
fn a_bad_csr_leaves_the_token_usable() {
    let reg = Registry::in_memory().unwrap();
    let ca = CertificateAuthority::generate().unwrap();
    let token = reg
        .issue_token("alpha", Duration::from_secs(60), NOW)
        .unwrap()
        .token;
    let err = reg
        .enrol(&token, None, NOW, |n| {
            ca.issue_client(b"junk", n, NOW, NOW + DAY)
        })
        .unwrap_err();
    assert_eq!(err.code(), ReasonCode::BadCsr);
    let (_, csr) = pki::new_key_and_csr("alpha").unwrap();
    reg.enrol(&token, None, NOW, sign(&ca, &csr)).unwrap();
}

#[test]
fn revocation_kills_every_certificate_of_the_node_even_after_reenrolment() {
    let path = temp_db("revoke");
    let reg = Registry::open(&path).unwrap();
    let ca = CertificateAuthority::generate().unwrap();
    let old = enrol(&reg, &ca, "alpha");
    let renewed = {
        let (_, csr) = pki::new_key_and_csr("alpha").unwrap();
        reg.renew(&old.info, NOW + 25 * DAY, sign(&ca, &csr))
            .unwrap()
    };
    // Both the old and the renewed certificate work until revocation.
    assert!(reg.is_live(&old.info.serial, "alpha").unwrap());
    assert!(reg.is_live(&renewed.info.serial, "alpha").unwrap());
    // A second connection (another process, like `fedveil-server revoke`)
    // revokes; this one notices through data_version.
    let version = reg.data_version().unwrap();
    let operator = Registry::open(&path).unwrap();
    assert_eq!(operator.revoke("alpha", NOW + 10).unwrap(), 2);
    assert_ne!(reg.data_version().unwrap(), version);
    for cert in [&old, &renewed] {
        assert!(matches!(
            reg.check(&cert.info),
            Err(RegistryRejection::Revoked { .. })
        ));
    }
    assert!(matches!(
        operator.revoke("alpha", NOW + 11),
        Err(EnrolError::Revoked(_))
    ));
    assert!(matches!(
        operator.revoke("nobody", NOW),
        Err(EnrolError::NoSuchNode(_))
    ));
    // Renewal with a revoked certificate is refused.
    let (_, csr) = pki::new_key_and_csr("alpha").unwrap();
    assert!(matches!(
        reg.renew(&renewed.info, NOW + 25 * DAY, sign(&ca, &csr)),
        Err(EnrolError::Revoked(_))
    ));
    // Enrolled again with a new token: the new certificate works, the old
    // ones stay revoked.
    let again = enrol(&reg, &ca, "alpha");
    assert_eq!(reg.check(&again.info), Ok(()));
    assert!(reg.check(&old.info).is_err());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn revocation_voids_pending_tokens_and_unknown_certificates_are_refused() {
    let reg = Registry::in_memory().unwrap();
    let ca = CertificateAuthority::generate().unwrap();
    // Two tokens for one name; the node enrols with the first.
    let ttl = Duration::from_secs(60);
    let first = reg.issue_token("omega", ttl, NOW).unwrap();
    let second = reg.issue_token("omega", ttl, NOW).unwrap();
    let (_, csr) = pki::new_key_and_csr("omega").unwrap();
    reg.enrol(&first.token, None, NOW, sign(&ca, &csr)).unwrap();
    // Revoking the node voids the second: it cannot re-enrol the name
    // behind the operator's back.
    reg.revoke("omega", NOW).unwrap();
    assert!(matches!(
        reg.enrol(&second.token, None, NOW, sign(&ca, &csr)),
        Err(EnrolError::TokenUsed)
    ));
    // Other names' tokens are untouched.
    let other = reg.issue_token("beta", ttl, NOW).unwrap();
    enrol(&reg, &ca, "gamma");
    reg.revoke("gamma", NOW).unwrap();
    reg.enrol(&other.token, None, NOW, sign(&ca, &csr)).unwrap();
    // A certificate our CA signed but the registry never recorded.
    let (_, csr) = pki::new_key_and_csr("ghost").unwrap();
    let ghost = ca.issue_client(&csr, "ghost", NOW, NOW + DAY).unwrap();
    assert!(matches!(
        reg.check(&ghost.info),
        Err(RegistryRejection::Unknown { .. })
    ));
}

/// Renewal opens in the last third of a certificate's life; the node's
/// previous certificates stay usable for the grace period (a lost answer
/// can be retried), are listed as live meanwhile, and are refused after.
#[test]
fn renewal_opens_late_and_supersedes_the_old_certificate_after_a_grace() {
    let reg = Registry::in_memory().unwrap();
    let ca = CertificateAuthority::generate().unwrap();
    let old = enrol(&reg, &ca, "alpha");
    let (_, csr) = pki::new_key_and_csr("alpha").unwrap();
    let early = reg
        .renew(&old.info, NOW + 10 * DAY, sign(&ca, &csr))
        .unwrap_err();
    assert_eq!(early.code(), ReasonCode::RenewalTooEarly);
    assert!(early.to_string().contains("last third"), "{early}");
    let at = NOW + 21 * DAY;
    let lost = reg.renew(&old.info, at, sign(&ca, &csr)).unwrap();
    // The answer was lost: the node retries with its old certificate.
    let (_, csr) = pki::new_key_and_csr("alpha").unwrap();
    let new = reg.renew(&old.info, at + 60, sign(&ca, &csr)).unwrap();
    let grace = DEFAULT_RENEWAL_GRACE.as_secs() as i64;
    let during = at + 120;
    assert!(reg.is_live_at(&old.info.serial, "alpha", during).unwrap());
    assert_eq!(reg.live_serials("alpha", during).unwrap().len(), 3);
    // The retry's grace ends a minute after the first one's.
    let after = at + 60 + grace + 1;
    for gone in [&old, &lost] {
        assert_eq!(
            reg.cert_state(&gone.info.serial, "alpha", after).unwrap(),
            CertState::Superseded
        );
    }
    assert_eq!(
        reg.cert_state(&new.info.serial, "alpha", after).unwrap(),
        CertState::Live
    );
    assert_eq!(
        reg.live_serials("alpha", after).unwrap(),
        vec![(new.info.serial.clone(), new.info.not_after)]
    );
    // A superseded certificate cannot renew either.
    let (_, csr) = pki::new_key_and_csr("alpha").unwrap();
    assert!(matches!(
        reg.renew(&old.info, after, sign(&ca, &csr)),
        Err(EnrolError::Superseded(_))
    ));
}
