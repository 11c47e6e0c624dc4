//! Why a connection ends: the close codes the gateway sends or counts,
//! each with the reason sent beside it, in one table.

/// Declares [`Close`] from one table: a code cannot lack its reason or its
/// place in the metrics, and none can be listed twice without a test
/// failing.
macro_rules! closes {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $reason:literal;)*) => {
        /// Why a connection ends: the WebSocket close code the gateway
        /// sends (or, for 1006, counts) and the reason sent with it.
        /// Request handlers return `Err(Close::..)` to end their connection.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Close {
            $($(#[$doc])* $name,)*
        }

        impl Close {
            /// Every close, in the order the metrics list them.
            pub const ALL: &'static [Close] = &[$(Close::$name),*];

            pub fn code(self) -> u16 {
                match self {
                    $(Close::$name => $code,)*
                }
            }

            /// The reason sent in the close frame (and logged).
            pub fn reason(self) -> &'static str {
                match self {
                    $(Close::$name => $reason,)*
                }
            }
        }
    };
}

closes! {
    Normal = 1000, "normal";
    GoingAway = 1001, "server shutting down";
    ProtocolError = 1002, "protocol error";
    UnsupportedData = 1003, "binary frames are not supported";
    /// Never sent: stands for "the connection ended without a close frame".
    Abnormal = 1006, "connection ended without a close";
    InvalidPayload = 1007, "invalid UTF-8";
    Policy = 1008, "policy violation";
    TooBig = 1009, "message too big";
    Internal = 1011, "internal error";
    InvalidJson = 4000, "too many invalid requests";
    UnknownProtocol = 4001, "expected hello";
    HelloTimeout = 4002, "no hello in time";
    Unauthorized = 4003, "unauthorized";
    SlowConsumer = 4008, "slow consumer";
    PongTimeout = 4009, "no pong in time";
}

impl Close {
    /// The close a code stands for, if the gateway knows it (a client may
    /// close with any code).
    pub fn from_code(code: u16) -> Option<Close> {
        Close::ALL.iter().copied().find(|c| c.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_close_has_its_own_code_and_a_reason_that_fits_a_close_frame() {
        for (i, c) in Close::ALL.iter().enumerate() {
            assert_eq!(Close::from_code(c.code()), Some(*c));
            assert!(
                Close::ALL[..i].iter().all(|o| o.code() != c.code()),
                "{c:?}'s code is listed twice"
            );
            // RFC 6455: a close frame's payload is at most 125 bytes, two
            // of them the code.
            assert!(!c.reason().is_empty() && c.reason().len() <= 123, "{c:?}");
        }
        assert_eq!(Close::from_code(4242), None);
    }
}
