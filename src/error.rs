//! SQLSTATE codes pgway itself sends, in one place.

/// `08P01` protocol_violation.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// `08006` connection_failure.
pub const CONNECTION_FAILURE: &str = "08006";
/// `28P01` invalid_password.
pub const INVALID_PASSWORD: &str = "28P01";
/// `28000` invalid_authorization_specification.
pub const INVALID_AUTHORIZATION: &str = "28000";
/// `53300` too_many_connections.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// `57P01` admin_shutdown.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// `0A000` feature_not_supported.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// `57014` query_canceled.
pub const QUERY_CANCELED: &str = "57014";
