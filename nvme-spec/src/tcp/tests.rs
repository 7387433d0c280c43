use super::*;

#[test]
fn crc32c_known_answer() {
    assert_eq!(data_digest(b"123456789"), 0xE306_9283);
}
