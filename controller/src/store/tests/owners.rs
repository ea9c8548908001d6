//! Who may change what: the owner rule, service settings that need authority, quotas per source.

use std::time::Duration;

use contract::model::{Algorithm, ServiceAsk, ServiceKey};

use super::{backend, origin, requester, store};
use crate::{
    error::StoreError,
    store::{Credential, Origin, Policy, RegistryLimits, Store},
};

#[test]
fn only_the_owner_the_same_credential_from_its_address_or_an_operator_ends_a_backend() {
    let store = store();
    let a = store.open_registration(origin("127.0.0.2"), Credential::Registrant).unwrap();
    store.register(a.id, ServiceKey::udp(53), backend("127.0.0.2:53"), ServiceAsk::default()).unwrap();
    let addr = "127.0.0.2:53".parse().unwrap();
    let not_owner = StoreError::NotOwner { service: ServiceKey::udp(53), backend: addr };
    // An anonymous stranger, even from the backend's own address, and a registrant from elsewhere: refused.
    let stranger = requester(None, Credential::Anonymous, "127.0.0.2");
    assert_eq!(store.unregister(ServiceKey::udp(53), addr, stranger, "test"), Err(not_owner.clone()));
    let elsewhere = requester(None, Credential::Registrant, "127.0.0.7");
    assert_eq!(store.unregister(ServiceKey::udp(53), addr, elsewhere, "test"), Err(not_owner));
    // The same credential from the backend's address (a new connection of the same server) may.
    let same = requester(None, Credential::Registrant, "127.0.0.2");
    assert!(matches!(store.unregister(ServiceKey::udp(53), addr, same, "test"), Ok(2)));
    assert!(!a.has_backends());
    assert_eq!(
        store.unregister(ServiceKey::udp(53), addr, same, "test"),
        Err(StoreError::NotFound { service: ServiceKey::udp(53), backend: addr })
    );
    drop(a);
    assert_eq!(store.snapshot().version, 2, "an empty registration closes without a new version");
}

#[tokio::test]
async fn an_operator_ends_any_backend_and_its_registration_is_told() {
    let store = store();
    let mut a = store.open_registration(origin("127.0.0.2"), Credential::Registrant).unwrap();
    store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    let addr = "127.0.0.2:80".parse().unwrap();
    let operator = requester(None, Credential::Operator, "127.0.0.9");
    store.unregister(ServiceKey::tcp(80), addr, operator, "drained for good").unwrap();
    let why = tokio::time::timeout(Duration::from_secs(1), a.ended_by_operator()).await.unwrap();
    assert!(why.contains("an operator at 127.0.0.9") && why.contains("drained for good"), "{why}");
    // Its own channel ending its own backend tells it nothing.
    let mut b = store.open_registration(origin("127.0.0.3"), Credential::Operator).unwrap();
    store.register(b.id, ServiceKey::tcp(81), backend("127.0.0.3:81"), ServiceAsk::default()).unwrap();
    b.unregister(
        ServiceKey::tcp(81),
        "127.0.0.3:81".parse().unwrap(),
        Credential::Operator,
        "127.0.0.3".parse().unwrap(),
    )
    .unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(50), b.ended_by_operator()).await.is_err());
}

#[test]
fn a_stranger_cannot_take_over_a_backend_by_registering_it() {
    let store = store();
    let agent =
        store.open_registration(Origin::grpc("127.0.0.2:4000".parse().unwrap()), Credential::Registrant).unwrap();
    store.register(agent.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    let anonymous = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let taken = store.register(anonymous.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default());
    assert!(matches!(taken, Err(StoreError::NotOwner { .. })), "{taken:?}");
    // Joining the service with its own backend is another matter.
    store.register(anonymous.id, ServiceKey::tcp(80), backend("127.0.0.2:81"), ServiceAsk::default()).unwrap();
}

#[test]
fn anonymous_registrations_choose_no_service_settings_while_the_token_is_set() {
    let policy =
        Policy { settings_need_authority: true, allowed_ports: "1-9000".parse().unwrap(), ..Policy::default() };
    let store = Store::new(policy, false);
    let anonymous = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let asked = ServiceAsk::algorithm(Algorithm::SourceHash);
    let refused = store.register(anonymous.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), asked).unwrap_err();
    assert_eq!(refused, StoreError::NeedsAuthority { service: ServiceKey::tcp(80), setting: "algorithm" });
    store.register(anonymous.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    let agent = store.open_registration(origin("127.0.0.3"), Credential::Registrant).unwrap();
    store.register(agent.id, ServiceKey::tcp(81), backend("127.0.0.3:81"), asked).unwrap();
}

#[test]
fn one_source_creates_at_most_its_quota_of_services() {
    let limits = RegistryLimits { services_per_source: 2, ..RegistryLimits::default() };
    let policy = Policy { limits, allowed_ports: "1-9000".parse().unwrap(), ..Policy::default() };
    let store = Store::new(policy, false);
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let b = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    store.register(b.id, ServiceKey::tcp(81), backend("127.0.0.2:81"), ServiceAsk::default()).unwrap();
    let third = store.register(b.id, ServiceKey::tcp(82), backend("127.0.0.2:82"), ServiceAsk::default());
    let address = "127.0.0.2".parse().unwrap();
    assert_eq!(third, Err(StoreError::TooManyServicesFromSource { address, max: 2 }));
    // Another source still creates services, and joins those of the first.
    let c = store.open_registration(origin("127.0.0.3"), Credential::Anonymous).unwrap();
    store.register(c.id, ServiceKey::tcp(82), backend("127.0.0.3:82"), ServiceAsk::default()).unwrap();
    let d = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(d.id, ServiceKey::tcp(82), backend("127.0.0.2:82"), ServiceAsk::default()).unwrap();
}
