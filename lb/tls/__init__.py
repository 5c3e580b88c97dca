"""TLS: certificates read and checked by the control process (``files``), contexts built the
same way everywhere (``contexts``), the server side of a listener in a worker (``server``:
SNI, handshake counting, hot swap), shared session-ticket keys (``ticketkeys``) and the
name lookup SNI uses (``names``)."""
