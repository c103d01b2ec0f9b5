//! Per-client limits that need shared state: open streams per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts open streams per client address, up to a cap.
#[derive(Clone)]
pub struct StreamSlots {
    max: usize,
    /// A std Mutex: nothing awaits while it is held.
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open stream's place; given back on drop.
pub struct Slot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl StreamSlots {
    pub fn new(max: usize) -> StreamSlots {
        StreamSlots {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more stream from `ip`, unless it has `max` open already.
    pub fn take(&self, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().expect("slots lock poisoned");
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            ip,
            open: self.open.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("slots lock poisoned");
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
