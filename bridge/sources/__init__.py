"""The two sources of events: the normal-callback receiver (HTTP) and the PullEvents poller. A source turns its
transport into events for :mod:`bridge.delivery` and the delivery's outcome back into its transport's answer
(an HTTP status, a ConfirmEvents); it knows nothing of spool, de-duplication or dead-letter rules."""
