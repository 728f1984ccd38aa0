//! The flash store on its own: record selection, torn records, layout checks.

use embedded_storage::nor_flash::ReadNorFlash;
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::store::Store;
use wpm_device_pm::StoreError;

const BANK: u32 = 8192;

fn flash() -> SimFlash {
    SimFlash::new(2 * 4096 + 2 * BANK as usize)
}

#[test]
fn blank_flash_is_an_empty_state() {
    let store = Store::open(flash(), BANK).unwrap();
    assert_eq!(store.state().sequence, 0);
    assert!(store.state().installed.is_empty());
    assert_eq!(store.free_bytes(), 2 * BANK);
}

#[test]
fn newest_record_wins_and_a_torn_one_is_ignored() {
    let mut store = Store::open(flash(), BANK).unwrap();
    store.update(|s| s.sequence = 1).unwrap(); // page A
    store.update(|s| s.sequence = 2).unwrap(); // page B
    store.update(|s| s.sequence = 3).unwrap(); // page A again
    let bytes = store.into_flash().as_bytes().to_vec();
    assert_eq!(
        Store::open(SimFlash::from_bytes(bytes.clone()), BANK)
            .unwrap()
            .state()
            .sequence,
        3
    );
    // Tear the newest record (page A): boot falls back to the one before.
    let mut torn = bytes;
    torn[20] ^= 0x01;
    let store = Store::open(SimFlash::from_bytes(torn), BANK).unwrap();
    assert_eq!(store.state().sequence, 2);
}

#[test]
fn chunks_round_trip_with_padding() {
    let mut store = Store::open(flash(), BANK).unwrap();
    store.erase_bank(1).unwrap();
    store.write(1, 0, b"hello").unwrap();
    store.write(1, 8, b"wasm").unwrap();
    assert_eq!(store.read(1, 0, 5).unwrap(), b"hello");
    assert_eq!(store.read(1, 5, 3).unwrap(), [0xFF; 3]);
    assert_eq!(store.read(1, 8, 4).unwrap(), b"wasm");
    assert!(
        store.write(1, 2, b"xy").is_err(),
        "misaligned write accepted"
    );
    let mut expect = b"hello\xff\xff\xffwasm".to_vec();
    expect.truncate(12);
    assert_eq!(store.digest(1, 12).unwrap(), wpm_manifests::sha256(&expect));
    // Bank 1 is the second bank, after the two state pages and bank 0.
    let flash = store.into_flash();
    assert_eq!(&flash.as_bytes()[8192 + 8192..][..5], b"hello");
    assert_eq!(flash.capacity(), 2 * 4096 + 2 * BANK as usize);
}

#[test]
fn other_bank_size_is_refused() {
    let mut store = Store::open(flash(), BANK).unwrap();
    store.update(|s| s.sequence = 1).unwrap();
    let f = store.into_flash();
    assert_eq!(
        Store::open(f, 4096).err(),
        Some(StoreError::LayoutChanged {
            stored: BANK,
            configured: 4096
        })
    );
    assert_eq!(
        Store::open(SimFlash::new(8192), BANK).err(),
        Some(StoreError::TooSmall)
    );
}
