//! Read-your-writes floors: the WAL position a client's reads must see.
//!
//! A floor is raised to the position of each write a client's scope acknowledged
//! ([`crate::config::ReadYourWrites`]): per connection (`session`), per user and database
//! (`user`), or per database (`global`). A session holds its floor's counter, so raising
//! and reading it is one atomic operation, with no lock and no look-up per statement.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::ReadYourWrites;
use crate::sync::lock;

/// Promotions seen: positions raised under an earlier primary count at most as the new
/// primary's position at its promotion (they may lie on a timeline that no longer exists,
/// which no replica of the new primary would ever replay).
#[derive(Debug, Default)]
struct Epoch {
    /// Promotions so far.
    number: AtomicU64,
    /// The position of the latest new primary when it was found.
    start: AtomicU64,
}

/// A floor's position, and the epoch it was raised in.
#[derive(Debug, Default)]
struct Cell {
    position: AtomicU64,
    epoch: AtomicU64,
}

/// A floor shared by the clients of one scope.
#[derive(Debug, Clone)]
pub struct Floor {
    cell: Arc<Cell>,
    epoch: Arc<Epoch>,
}

impl Floor {
    fn new(epoch: &Arc<Epoch>) -> Self {
        Self {
            cell: Arc::new(Cell {
                position: AtomicU64::new(0),
                epoch: AtomicU64::new(epoch.number.load(Ordering::Acquire)),
            }),
            epoch: Arc::clone(epoch),
        }
    }

    /// The position reads must see now (0: none).
    pub fn get(&self) -> u64 {
        let position = self.cell.position.load(Ordering::Acquire);
        if self.cell.epoch.load(Ordering::Acquire) < self.epoch.number.load(Ordering::Acquire) {
            position.min(self.epoch.start.load(Ordering::Acquire))
        } else {
            position
        }
    }

    /// Raises the floor to `position` (never lowers it, except to forget positions of a
    /// primary that has been replaced).
    pub fn raise(&self, position: u64) {
        let now = self.epoch.number.load(Ordering::Acquire);
        if self.cell.epoch.swap(now, Ordering::AcqRel) < now {
            let start = self.epoch.start.load(Ordering::Acquire);
            self.cell.position.fetch_min(start, Ordering::AcqRel);
        }
        self.cell.position.fetch_max(position, Ordering::AcqRel);
    }
}

/// The floors of every scope key, by `routing.read_your_writes`.
#[derive(Debug)]
pub struct Floors {
    /// `routing.read_your_writes`, set again by a reload (for clients that log in after).
    scope: Mutex<ReadYourWrites>,
    shared: Mutex<HashMap<(String, String), Floor>>,
    epoch: Arc<Epoch>,
}

impl Floors {
    /// Floors for `scope`.
    pub fn new(scope: ReadYourWrites) -> Self {
        Self {
            scope: Mutex::new(scope),
            shared: Mutex::new(HashMap::new()),
            epoch: Arc::new(Epoch::default()),
        }
    }

    /// The floor a new client of `user` on `database` reads under and raises; `None`
    /// with read-your-writes off.
    pub fn for_client(&self, database: &str, user: &str) -> Option<Floor> {
        let scope = *lock(&self.scope);
        let key = match scope {
            ReadYourWrites::Off => return None,
            ReadYourWrites::Session => return Some(Floor::new(&self.epoch)),
            ReadYourWrites::User => (database.to_owned(), user.to_owned()),
            ReadYourWrites::Global => (database.to_owned(), String::new()),
        };
        let mut shared = lock(&self.shared);
        Some(
            shared
                .entry(key)
                .or_insert_with(|| Floor::new(&self.epoch))
                .clone(),
        )
    }

    /// The scope in force.
    pub fn scope(&self) -> ReadYourWrites {
        *lock(&self.scope)
    }

    /// A reload: clients that log in from now on read under `scope`'s floors. (Clients
    /// logged in keep theirs.)
    pub fn set_scope(&self, scope: ReadYourWrites) {
        *lock(&self.scope) = scope;
    }

    /// A new primary was found at `position`: every floor raised before counts at most
    /// as `position` from now on.
    pub fn promoted(&self, position: u64) {
        self.epoch.start.store(position, Ordering::Release);
        self.epoch.number.fetch_add(1, Ordering::AcqRel);
    }
}

/// Formats a WAL position as PostgreSQL does (`16/B374D848`).
pub fn format_lsn(position: u64) -> String {
    format!("{:X}/{:X}", position >> 32, position & 0xFFFF_FFFF)
}

/// Parses a WAL position as PostgreSQL writes it (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let valid = |part: &str| !part.is_empty() && part.len() <= 8;
    if !valid(high) || !valid(low) {
        return None;
    }
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    Some(high << 32 | low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        for bad in ["", "16", "/1", "1/", "x/1", "1/123456789", "1/2/3"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn scopes_share_floors_as_configured() {
        let user = Floors::new(ReadYourWrites::User);
        let a = user.for_client("db", "u1").expect("on");
        a.raise(10);
        a.raise(5);
        assert_eq!(user.for_client("db", "u1").expect("on").get(), 10);
        assert_eq!(user.for_client("db", "u2").expect("on").get(), 0);
        let session = Floors::new(ReadYourWrites::Session);
        session.for_client("db", "u1").expect("on").raise(7);
        assert_eq!(session.for_client("db", "u1").expect("on").get(), 0);
        let global = Floors::new(ReadYourWrites::Global);
        global.for_client("db", "u1").expect("on").raise(3);
        assert_eq!(global.for_client("db", "u2").expect("on").get(), 3);
        assert!(Floors::new(ReadYourWrites::Off)
            .for_client("db", "u")
            .is_none());
    }

    #[test]
    fn a_promotion_caps_the_floors_raised_before_it() {
        let floors = Floors::new(ReadYourWrites::User);
        let a = floors.for_client("db", "a").expect("on");
        a.raise(1000);
        floors.promoted(600);
        assert_eq!(
            a.get(),
            600,
            "the old primary's position counts as the promotion's"
        );
        a.raise(650);
        assert_eq!(a.get(), 650, "a write on the new primary raises it again");
        a.raise(640);
        assert_eq!(a.get(), 650);
        let b = floors.for_client("db", "b").expect("on");
        b.raise(700);
        assert_eq!(b.get(), 700);
    }
}
