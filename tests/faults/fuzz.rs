//! (placeholder: tests land here)
