//! Where the report of `inspect`, `rewrite` and `calibrate` goes: standard output (warnings to
//! standard error) for the binary, or, inside [`capture`], a buffer handed back to the caller
//! (the Python module returns it instead of printing). The text is the same either way.

use std::cell::RefCell;
use std::fmt;

/// What a command reported while captured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// Everything it would have printed on standard output.
    pub stdout: String,
    /// Its warnings, each without the `warning: ` prefix the binary prints.
    pub warnings: Vec<String>,
}

thread_local! {
    static SINK: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's report captured; nested captures each get their own.
pub fn capture<T>(f: impl FnOnce() -> T) -> (T, Captured) {
    let outer = SINK.with(|sink| sink.replace(Some(Captured::default())));
    // Puts the outer capture (or none) back, also when `f` panics.
    struct Restore(Option<Captured>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SINK.with(|sink| *sink.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(outer);
    let value = f();
    let captured = SINK
        .with(|sink| sink.borrow_mut().take())
        .unwrap_or_default();
    (value, captured)
}

/// Prints `text` on standard output, or appends it to the capture.
pub fn print(text: fmt::Arguments<'_>) {
    let printed = SINK.with(|sink| match sink.borrow_mut().as_mut() {
        Some(captured) => {
            fmt::Write::write_fmt(&mut captured.stdout, text).expect("writing to a String");
            true
        }
        None => false,
    });
    if !printed {
        print!("{text}");
    }
}

/// Prints `warning: {text}` on standard error, or records `text` in the capture.
pub fn warning(text: fmt::Arguments<'_>) {
    let recorded = SINK.with(|sink| match sink.borrow_mut().as_mut() {
        Some(captured) => {
            captured.warnings.push(text.to_string());
            true
        }
        None => false,
    });
    if !recorded {
        eprintln!("warning: {text}");
    }
}

/// `println!` through [`print`].
macro_rules! say {
    () => {
        $crate::cli::output::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`print`].
macro_rules! say_raw {
    ($($arg:tt)*) => {
        $crate::cli::output::print(format_args!($($arg)*))
    };
}

/// `eprintln!("warning: ...")` through [`warning`].
macro_rules! say_warning {
    ($($arg:tt)*) => {
        $crate::cli::output::warning(format_args!($($arg)*))
    };
}

pub(crate) use {say, say_raw, say_warning};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_nest_and_restore() {
        let ((), outer) = capture(|| {
            say!("one {}", 1);
            let ((), inner) = capture(|| {
                say_raw!("two");
                say_warning!("careful");
            });
            assert_eq!(inner.stdout, "two");
            assert_eq!(inner.warnings, ["careful"]);
            say!();
        });
        assert_eq!(outer.stdout, "one 1\n\n");
        assert!(outer.warnings.is_empty());
    }
}
