//! The board-independent device loop: the device-pm core driven over an embassy-net TCP
//! connection to the MQTT broker, with the module store on a NOR flash.
//!
//! A board supplies the pieces that differ ([`Board`]: a network stack that is up, the
//! wall clock, a console) and calls [`run`]. Everything the device decides is the core's;
//! this loop only moves bytes and time:
//!
//! * connects (DNS or a dotted IPv4 address from the provisioning record), with the core's
//!   last will as MQTT will and a keep-alive;
//! * turns `Subscribe`/`Unsubscribe`/`Publish` outputs into MQTT packets with the QoS of
//!   the shared [`Tuning`] (reports at least once, subscriptions at most once: the core
//!   re-requests what it misses after a timeout and republishes its whole status on every
//!   `LinkUp`);
//! * delivers incoming publishes as `Input::Message`, and `Input::Timer` at `next_timer()`;
//! * sends PINGREQ when the link was quiet for half the keep-alive and drops the
//!   connection when no PINGRESP came back within the keep-alive;
//! * on any error: `Input::LinkDown`, back-off (the tuning's, doubling), reconnect.
#![no_std]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;
use core::num::NonZero;
use embassy_futures::select::{select, Either};
use embassy_net::tcp::TcpSocket;
use embassy_net::{IpAddress, Stack};
use embassy_time::{Duration, Instant, Timer};
use embedded_storage::nor_flash::NorFlash;
use rust_mqtt::buffer::AllocBuffer;
use rust_mqtt::client::event::Event;
use rust_mqtt::client::options::{
    ConnectOptions, PublicationOptions, SubscriptionOptions, TopicReference, UnsubscriptionOptions,
    WillOptions,
};
use rust_mqtt::client::{Client, MqttError};
use rust_mqtt::config::KeepAlive;
use rust_mqtt::types::{MqttBinary, MqttString, QoS, TopicFilter, TopicName};
use rust_mqtt::Bytes;
use wpm_device_pm::{Config, Device, Input, Output, Qos};

pub use wpm_device_pm::Tuning;
pub use wpm_provisioning::Record;

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

/// What the loop needs from the board.
pub trait Board {
    /// Unix milliseconds now. Deployments expire, so the device needs wall time: the
    /// nRF9160 gets it from the LTE network, the QEMU board from the host.
    fn unix_ms(&self) -> u64;
    /// A line for whoever watches the device (semihosting, RTT, nothing).
    fn log(&self, args: fmt::Arguments<'_>);
}

/// The device-pm configuration for a provisioned device.
pub fn config(record: &Record, tuning: Tuning) -> Config {
    Config {
        device_id: record.device_id.clone(),
        groups: record.groups.clone(),
        trusted_keys: record.trusted_keys(),
        device_key: *record.device_key,
        sequence_floor: record.sequence_floor,
        tuning,
    }
}

/// Why a connection ended.
enum Ended {
    Network,
    Broker,
    KeepAliveTimeout,
    /// The flash did not take the next report epoch, so no report can be numbered.
    Storage,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ended::Network => "network error",
            Ended::Broker => "broker refused or sent garbage",
            Ended::KeepAliveTimeout => "no PINGRESP within the keep-alive",
            Ended::Storage => "flash refused the report counter's epoch",
        })
    }
}

fn mqtt_err<const N: usize>(e: MqttError<'_, N>) -> Ended {
    match e {
        MqttError::Network(_) => Ended::Network,
        _ => Ended::Broker,
    }
}

type Mqtt<'a, 'b> = Client<
    'a,
    'b,
    TcpSocket<'a>,
    AllocBuffer,
    16,
    16,
    { wpm_device_pm::PUBLISH_WINDOW as usize },
    1,
    1,
    0,
    0,
>;

/// Runs the device forever.
pub async fn run<F: NorFlash, B: Board>(
    stack: Stack<'_>,
    board: &B,
    record: &Record,
    tuning: &Tuning,
    mut device: Device<F>,
) -> ! {
    let mut backoff_ms = 0;
    let mut rx = [0u8; 6144];
    let mut tx = [0u8; 2048];
    loop {
        let started = Instant::now();
        match session(stack, board, record, tuning, &mut device, &mut rx, &mut tx).await {
            Ok(never) => match never {},
            Err(why) => board.log(format_args!("wpm: link down: {why}")),
        }
        device.handle(board.unix_ms(), Input::LinkDown);
        drain_logs(&mut device, board);
        // A session that lasted resets the back-off; a broker that keeps failing at once
        // is not hammered.
        if started.elapsed() > Duration::from_millis(tuning.reconnect_max_ms) {
            backoff_ms = 0;
        }
        backoff_ms = tuning.next_backoff_ms(backoff_ms);
        // Meanwhile modules keep running on their turn timer.
        let until = Instant::now() + Duration::from_millis(backoff_ms);
        while Instant::now() < until {
            let wake = next_wake(&device, board).min(until);
            Timer::at(wake).await;
            if due(&device, board) {
                device.handle(board.unix_ms(), Input::Timer);
                drain_logs(&mut device, board);
            }
        }
    }
}

/// The instant of the core's next timer, on the monotonic clock.
fn next_wake<F: NorFlash, B: Board>(device: &Device<F>, board: &B) -> Instant {
    match device.next_timer() {
        Some(at) => {
            let now = board.unix_ms();
            Instant::now() + Duration::from_millis(at.saturating_sub(now))
        }
        None => Instant::now() + Duration::from_secs(3600),
    }
}

fn due<F: NorFlash, B: Board>(device: &Device<F>, board: &B) -> bool {
    device.next_timer().is_some_and(|t| t <= board.unix_ms())
}

fn drain_logs<F: NorFlash, B: Board>(device: &mut Device<F>, board: &B) {
    while let Some(out) = device.poll_output() {
        if let Output::Log {
            module, message, ..
        } = out
        {
            board.log(format_args!("[{module}] {message}"));
        }
    }
}

async fn resolve(stack: Stack<'_>, host: &str) -> Option<IpAddress> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some(IpAddress::Ipv4(ip));
    }
    let found = stack
        .dns_query(host, embassy_net::dns::DnsQueryType::A)
        .await
        .ok()?;
    found.first().copied()
}

async fn session<F: NorFlash, B: Board>(
    stack: Stack<'_>,
    board: &B,
    record: &Record,
    tuning: &Tuning,
    device: &mut Device<F>,
    rx: &mut [u8],
    tx: &mut [u8],
) -> Result<core::convert::Infallible, Ended> {
    let keep_alive_s = tuning.keep_alive_s.max(1);
    stack.wait_config_up().await;
    let Some(ip) = resolve(stack, &record.broker_host).await else {
        board.log(format_args!("wpm: cannot resolve {}", record.broker_host));
        return Err(Ended::Network);
    };
    let mut socket = TcpSocket::new(stack, rx, tx);
    socket.set_timeout(Some(Duration::from_secs(u64::from(keep_alive_s) * 2)));
    socket
        .connect((ip, record.broker_port))
        .await
        .map_err(|_| Ended::Network)?;
    board.log(format_args!(
        "wpm: TCP up to {}:{}",
        record.broker_host, record.broker_port
    ));

    let mut buffer = AllocBuffer;
    let mut client: Mqtt<'_, '_> = Client::new(&mut buffer);
    let (will_topic, will_payload) = device.last_will().map_err(|_| Ended::Storage)?;
    let will_topic = MqttString::try_from(will_topic.as_str()).map_err(|_| Ended::Broker)?;
    let will_topic = TopicName::new(will_topic).ok_or(Ended::Broker)?;
    let will_payload = MqttBinary::try_from(will_payload.as_slice()).map_err(|_| Ended::Broker)?;
    let (_, password) = device.broker_login();
    let user_name = MqttString::try_from(record.device_id.as_str()).map_err(|_| Ended::Broker)?;
    let password = MqttBinary::try_from(password.as_bytes()).map_err(|_| Ended::Broker)?;
    let options = ConnectOptions::new()
        .user_name(user_name)
        .password(password)
        .clean_start()
        .keep_alive(KeepAlive::Seconds(NonZero::new(keep_alive_s).unwrap()))
        .will(
            WillOptions::new(will_topic, will_payload)
                .retain()
                .qos(qos(tuning.publish_qos)),
        );
    let client_id = MqttString::try_from(record.device_id.as_str()).map_err(|_| Ended::Broker)?;
    client
        .connect(socket, &options, Some(client_id))
        .await
        .map_err(mqtt_err)?;
    board.log(format_args!("wpm: MQTT connected as {}", record.device_id));

    device.handle(board.unix_ms(), Input::LinkUp);
    let keep_alive = Duration::from_secs(u64::from(keep_alive_s));
    let mut last_sent = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut pending: VecDeque<Output> = VecDeque::new();
    loop {
        // Carry out what the core asked for. A full subscribe/unsubscribe window leaves
        // the rest queued until acknowledgements come back.
        while let Some(out) = device.poll_output() {
            pending.push_back(out);
        }
        while let Some(out) = pending.pop_front() {
            match perform(&mut client, &out, tuning, board).await {
                Ok(true) => last_sent = Instant::now(),
                Ok(false) => {
                    pending.push_front(out);
                    break;
                }
                Err(e) => return Err(e),
            }
        }

        if let Some(sent) = ping_sent {
            if sent.elapsed() > keep_alive {
                return Err(Ended::KeepAliveTimeout);
            }
        }
        let ping_at = last_sent + keep_alive / 2;
        let wake = next_wake(device, board).min(ping_at);
        match select(client.poll_header(), Timer::at(wake)).await {
            Either::First(header) => {
                let header = header.map_err(mqtt_err)?;
                let event = client.poll_body(header).await.map_err(mqtt_err)?;
                match event {
                    Event::Publish(p) => {
                        let topic = match &p.topic {
                            TopicReference::Name(t) | TopicReference::Mapping(t, _) => {
                                let s: &MqttString<'_> = t.as_ref();
                                String::from(s.as_ref())
                            }
                            TopicReference::Alias(_) => continue,
                        };
                        let payload: Vec<u8> = p.message.to_vec();
                        device.handle(
                            board.unix_ms(),
                            Input::Message {
                                topic: &topic,
                                payload: &payload,
                            },
                        );
                    }
                    Event::Pingresp => ping_sent = None,
                    _ => {}
                }
            }
            Either::Second(()) => {
                if due(device, board) {
                    device.handle(board.unix_ms(), Input::Timer);
                }
                if Instant::now() >= ping_at && ping_sent.is_none() {
                    client.ping().await.map_err(mqtt_err)?;
                    ping_sent = Some(Instant::now());
                    last_sent = Instant::now();
                }
            }
        }
    }
}

/// Sends one output. `Ok(false)`: the client's window for (un)subscribe or publish
/// acknowledgements is full; try again after polling.
async fn perform<B: Board>(
    client: &mut Mqtt<'_, '_>,
    out: &Output,
    tuning: &Tuning,
    board: &B,
) -> Result<bool, Ended> {
    let result = match out {
        Output::Subscribe { topic } => {
            let t = MqttString::try_from(topic.as_str()).map_err(|_| Ended::Broker)?;
            let filter = TopicFilter::new(t).ok_or(Ended::Broker)?;
            client
                .subscribe(
                    filter,
                    &SubscriptionOptions::new().qos(qos(tuning.subscribe_qos)),
                )
                .await
                .map(|_| ())
        }
        Output::Unsubscribe { topic } => {
            let t = MqttString::try_from(topic.as_str()).map_err(|_| Ended::Broker)?;
            let filter = TopicFilter::new(t).ok_or(Ended::Broker)?;
            client
                .unsubscribe(filter, &UnsubscriptionOptions::new())
                .await
                .map(|_| ())
        }
        Output::Publish {
            topic,
            payload,
            retain,
        } => {
            let t = MqttString::try_from(topic.as_str()).map_err(|_| Ended::Broker)?;
            let name = TopicName::new(t).ok_or(Ended::Broker)?;
            let mut options =
                PublicationOptions::new(TopicReference::Name(name)).qos(qos(tuning.publish_qos));
            if *retain {
                options = options.retain();
            }
            client
                .publish(&options, Bytes::from(payload.as_slice()))
                .await
                .map(|_| ())
        }
        Output::Log {
            module, message, ..
        } => {
            board.log(format_args!("[{module}] {message}"));
            return Ok(true);
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(MqttError::SessionBuffer | MqttError::SendQuotaExceeded) => Ok(false),
        Err(e) => Err(mqtt_err(e)),
    }
}

/// A window `[base, base + size)` of a larger NOR flash, seen from offset 0: the module
/// store gets its region of the chip's flash and cannot touch the image or the
/// provisioning page. `base` and `size` must be whole erase pages.
pub struct FlashRegion<F> {
    flash: F,
    base: u32,
    size: u32,
}

impl<F: NorFlash> FlashRegion<F> {
    pub fn new(flash: F, base: u32, size: u32) -> Self {
        assert!(
            base as usize % F::ERASE_SIZE == 0 && size as usize % F::ERASE_SIZE == 0,
            "flash region not page aligned"
        );
        assert!(
            (base + size) as usize <= flash.capacity(),
            "flash region past the chip"
        );
        Self { flash, base, size }
    }

    fn bounds(
        &self,
        offset: u32,
        len: usize,
    ) -> Result<u32, embedded_storage::nor_flash::NorFlashErrorKind> {
        if (offset as usize).saturating_add(len) > self.size as usize {
            return Err(embedded_storage::nor_flash::NorFlashErrorKind::OutOfBounds);
        }
        Ok(self.base + offset)
    }
}

impl<F: NorFlash> embedded_storage::nor_flash::ErrorType for FlashRegion<F> {
    type Error = embedded_storage::nor_flash::NorFlashErrorKind;
}

impl<F: NorFlash> embedded_storage::nor_flash::ReadNorFlash for FlashRegion<F> {
    const READ_SIZE: usize = F::READ_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        use embedded_storage::nor_flash::NorFlashError as _;
        let at = self.bounds(offset, bytes.len())?;
        self.flash.read(at, bytes).map_err(|e| e.kind())
    }

    fn capacity(&self) -> usize {
        self.size as usize
    }
}

impl<F: NorFlash> NorFlash for FlashRegion<F> {
    const WRITE_SIZE: usize = F::WRITE_SIZE;
    const ERASE_SIZE: usize = F::ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        use embedded_storage::nor_flash::NorFlashError as _;
        if to < from {
            return Err(embedded_storage::nor_flash::NorFlashErrorKind::OutOfBounds);
        }
        let start = self.bounds(from, (to - from) as usize)?;
        self.flash
            .erase(start, start + (to - from))
            .map_err(|e| e.kind())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        use embedded_storage::nor_flash::NorFlashError as _;
        let at = self.bounds(offset, bytes.len())?;
        self.flash.write(at, bytes).map_err(|e| e.kind())
    }
}

/// Unix seconds of a calendar date and time (UTC), for network time from the modem.
pub fn unix_seconds(year: u32, month: u32, day: u32, h: u32, m: u32, s: u32) -> u64 {
    // Days from civil (Howard Hinnant's algorithm), valid for the Gregorian calendar.
    let y = if month <= 2 { year - 1 } else { year } as i64;
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + (h * 3600 + m * 60 + s) as i64) as u64
}
