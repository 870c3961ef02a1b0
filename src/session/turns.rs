//! Turns for welcomes: at most [`MAX_WELCOMES`] read, render and write a
//! room's history at once, so a join storm holds a few histories in memory
//! at a time, not one per joiner (the welcome itself is `welcome.rs`).

use std::sync::{Condvar, Mutex};

/// Most welcomes (a history read, rendered, and written as far as the
/// socket takes it at once) under way together.
pub const MAX_WELCOMES: usize = 4;

/// A counting semaphore for welcomes: [`Welcomes::start`] waits for a
/// free place, and the place is freed when its [`Turn`] is dropped.
#[derive(Default)]
pub struct Welcomes {
    under_way: Mutex<usize>,
    freed: Condvar,
}

/// One welcome's place; dropping it lets the next one start.
pub struct Turn<'a>(&'a Welcomes);

impl Welcomes {
    /// Waits until fewer than [`MAX_WELCOMES`] are under way, and takes a
    /// place. Never waits long: a turn covers reading the history,
    /// rendering it and writing what the socket takes at once, never a wait
    /// for a client to read.
    pub fn start(&self) -> Turn<'_> {
        let mut under_way = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        while *under_way >= MAX_WELCOMES {
            under_way = self
                .freed
                .wait(under_way)
                .unwrap_or_else(|p| p.into_inner());
        }
        *under_way += 1;
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.under_way.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}
