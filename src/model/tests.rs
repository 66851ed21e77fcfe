use super::*;

#[test]
fn reason_codes_are_the_stable_contract() {
    for r in Reason::ALL {
        assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
        // The JSON/serde spelling is the same code.
        assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        assert_eq!(Verdict::new(r).status, r.status());
    }
    assert!("no_such_reason".parse::<Reason>().is_err());
    let failing: Vec<_> = Reason::ALL.iter().filter(|r| r.is_transient()).collect();
    assert!(failing.iter().all(|r| !r.status().requires_reauth()));
    assert!(Reason::ProviderNotexist.is_expiry_signal());
    assert!(!Reason::DeprecatedHost.is_expiry_signal());
    assert_eq!(Reason::ALL.len(), 48);
}
