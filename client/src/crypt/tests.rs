use super::*;

fn ring(master: u8) -> Keyring {
    Keyring::new("g".into(), &[[master; 32]])
}

#[test]
fn seal_open_round_trip_both_codecs() {
    let r = ring(1);
    let mut enc = blob::Encoder::new(3);
    let text = b"INSERT INTO users VALUES ('alice@example.com');\n".repeat(2000);
    let noise: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for data in [&text[..], &noise[..], b""] {
        let (id, b) = r.current().seal(&mut enc, data);
        assert_eq!(id, r.current().chunk_id(data));
        assert_ne!(id, ChunkId::of(data), "sealed ids are keyed");
        assert_eq!(blob::header(&b).unwrap().codec, Codec::Sealed);
        assert!(blob::check(&b, &id).unwrap().sealed, "the server's checks pass");
        assert_eq!(r.open(&b, &id).unwrap(), data);
        assert!(!b.windows(20).any(|w| text.windows(20).next() == Some(w)), "no plaintext in the blob");
    }
    // Compressed before sealing: the text shrinks.
    let (_, b) = r.current().seal(&mut enc, &text);
    assert!(b.len() < text.len() / 4);
    // Random nonces: the same chunk seals to other bytes each time.
    assert_ne!(r.current().seal(&mut enc, &text).1, b);
}

#[test]
fn wrong_key_swapped_chunk_and_damage_are_told_apart() {
    let (r, other) = (ring(1), ring(2));
    let mut enc = blob::Encoder::new(3);
    let (id, b) = r.current().seal(&mut enc, b"secret payroll");
    assert!(matches!(other.open(&b, &id), Err(OpenError::WrongKey(_))));
    // Another chunk of the same group under this id: caught before the AEAD.
    let (_, b2) = r.current().seal(&mut enc, b"another chunk");
    assert!(matches!(r.open(&b2, &id), Err(OpenError::Blob(BlobError::Hash { .. }))));
    // A flipped byte in the ciphertext: the ciphertext hash says damaged.
    let mut bad = b.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(r.open(&bad, &id), Err(OpenError::Blob(BlobError::CiphertextHash(_)))));
    // A plain blob where a sealed one was asked for.
    let plain = blob::encode(b"secret payroll", 3);
    assert!(r.open(&plain, &ChunkId::of(b"secret payroll")).is_err());
    // Rotation: a ring with a newer key still opens the old key's chunks.
    let rotated = Keyring::new("g".into(), &[[1; 32], [3; 32]]);
    assert_eq!(rotated.open(&b, &id).unwrap(), b"secret payroll");
    assert_ne!(rotated.current().chunk_id(b"x"), r.current().chunk_id(b"x"));
}

#[test]
fn a_valid_aead_under_a_recomputed_hash_still_cannot_pass_as_another_id() {
    // A server that rewrites the key hash and ciphertext hash to pass a
    // blob off under another id: the id check needs a K that hashes to
    // that id, and the AEAD is bound to the id.
    let r = ring(1);
    let mut enc = blob::Encoder::new(3);
    let (id_a, a) = r.current().seal(&mut enc, b"chunk a");
    let (id_b, _) = r.current().seal(&mut enc, b"chunk b");
    let mut forged = a.clone();
    forged[seal::KEY_HASH_AT..seal::CT_HASH_AT].copy_from_slice(&r.current().key_hash(b"chunk b"));
    seal::finish(&id_b, &mut forged);
    assert!(blob::check(&forged, &id_b).is_ok(), "a forger can pass the keyless checks");
    assert!(matches!(r.open(&forged, &id_b), Err(OpenError::WrongKey(_))), "but not the AEAD");
    assert_eq!(r.open(&a, &id_a).unwrap(), b"chunk a");
}

#[test]
fn golden_bytes_of_a_sealed_blob() {
    let k = Keys::derive(&[0; 32]);
    assert_eq!(k.key_id(), GOLDEN_KEY_ID);
    let mut enc = blob::Encoder::new(3);
    let (id, b) = k.seal_nonce(&mut enc, &k.key_hash(b"hi"), b"hi", [9; NONCE_LEN]);
    assert_eq!(&b[..10], b"BKPC\x01\x03\x02\x00\x00\x00");
    assert_eq!(&b[seal::NONCE_AT..seal::BODY_AT], [9; NONCE_LEN]);
    // Inner blob "BKPC 1 0 len=2 hi" (12 bytes) sealed, then the tag.
    assert_eq!(b.len(), seal::BODY_AT + 12 + TAG_LEN);
    assert_eq!(hex::encode(&b[seal::BODY_AT..]), GOLDEN_BODY);
    assert_eq!(&id.to_hex()[..16], GOLDEN_ID);
}

const GOLDEN_KEY_ID: &str = "19b47d51d6072a4b";
const GOLDEN_BODY: &str = "58242628448944e5b996ee830e7ae58d5e99a88f249c78cabbd0166b";
const GOLDEN_ID: &str = "25ae34678612c1f3";
