//! Random identities: 128 bits from the kernel's generator, as 32 lowercase hex digits.

use std::io::Read;

/// A fresh random id (32 lowercase hex digits).
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if filled.is_err() {
        // No /dev/urandom (a bare chroot): the process's own randomized hasher, twice.
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        bytes[..8].copy_from_slice(&state.hash_one(std::process::id()).to_le_bytes());
        bytes[8..].copy_from_slice(&state.hash_one(std::time::SystemTime::now()).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` is an id [`random_id`] makes.
pub fn is_id(text: &str) -> bool {
    text.len() == 32
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_hex() {
        let (a, b) = (random_id(), random_id());
        assert!(is_id(&a) && is_id(&b) && a != b);
        assert!(!is_id("xyz") && !is_id(&a.to_uppercase()) && !is_id(&a[1..]));
    }
}
