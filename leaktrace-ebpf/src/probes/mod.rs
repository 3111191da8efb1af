//! The programs, one file per family of probed functions. Userspace attaches
//! each by its name (`<family>_enter_<symbol>`, `<family>_exit_<symbol>`),
//! so a program's name never changes.

mod alloc;
mod kernel;
mod kmem;
mod linker;
mod mmap;
mod thread;

/// What a program's `try_` function returns. An `Err` ends the event early;
/// where that loses something, the function has counted it in `LOST` first.
type Result = core::result::Result<(), ()>;
