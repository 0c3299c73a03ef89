//! Mutex locking that outlives a panicked holder.
/// A mutex lock that survives a panicked holder. The relay's mutexes guard small self-contained
/// state (caches, counters, readiness reasons) that stays consistent between statements, and the
/// supervisor has already reported the panic: refusing the lock forever would turn one bug into
/// a dead pipeline.
pub(crate) trait LockUnpoisoned<T> {
    fn lock_unpoisoned(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> LockUnpoisoned<T> for std::sync::Mutex<T> {
    fn lock_unpoisoned(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
