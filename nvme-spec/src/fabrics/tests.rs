use super::*;

#[test]
fn discovery_nqn_is_valid() {
    assert_eq!(validate_nqn(DISCOVERY_NQN), Ok(()));
}
