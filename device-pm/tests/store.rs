//! The flash store on its own: record selection, torn records, layout checks.

use embedded_storage::nor_flash::ReadNorFlash;
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::store::Store;
use wpm_device_pm::StoreError;

const BANK: u32 = 8192;

fn flash() -> SimFlash {
    SimFlash::new(4 * 4096 + 2 * BANK as usize)
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
    // Appended one after the other in the first ring page.
    store.update(|s| s.sequence = 1).unwrap();
    store.update(|s| s.sequence = 2).unwrap();
    store.update(|s| s.sequence = 3).unwrap();
    let bytes = store.into_flash().as_bytes().to_vec();
    assert_eq!(
        Store::open(SimFlash::from_bytes(bytes.clone()), BANK)
            .unwrap()
            .state()
            .sequence,
        3
    );
    // Tear the newest record (its CRC, the last written byte): boot falls back to the
    // one before, and appends the next record on a fresh page, not over the torn one.
    let mut torn = bytes;
    let last = torn[..4096].iter().rposition(|b| *b != 0xFF).unwrap();
    torn[last] ^= 0x01;
    let mut store = Store::open(SimFlash::from_bytes(torn), BANK).unwrap();
    assert_eq!(store.state().sequence, 2);
    store.update(|s| s.sequence = 4).unwrap();
    let flash = store.into_flash();
    assert_eq!(flash.page_erases()[..2], [0, 1]);
    let store = Store::open(SimFlash::from_bytes(flash.as_bytes().to_vec()), BANK).unwrap();
    assert_eq!(store.state().sequence, 4);
}

#[test]
fn chunks_round_trip_with_padding() {
    let mut store = Store::open(flash(), BANK).unwrap();
    store.erase_bank(1, BANK).unwrap();
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
    // Bank 1 is the second bank, after the four state pages and bank 0.
    let flash = store.into_flash();
    assert_eq!(&flash.as_bytes()[4 * 4096 + 8192..][..5], b"hello");
    assert_eq!(flash.capacity(), 4 * 4096 + 2 * BANK as usize);
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
