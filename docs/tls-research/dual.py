import ssl, socket, threading, subprocess
C = "/tmp/tlsexp/certs/"
s = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
s.load_cert_chain(C + "default.chain.pem", C + "default.key"); s.load_cert_chain(C + "rsa.pem", C + "rsa.key")
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8); port = ls.getsockname()[1]
def serve():
    for _ in range(2):
        c, _ = ls.accept()
        try:
            t = s.wrap_socket(c, server_side=True); t.close()
        except Exception: c.close()
threading.Thread(target=serve, daemon=True).start()
for sig in ("ecdsa_secp256r1_sha256", "rsa_pss_rsae_sha256"):
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-sigalgs", sig, "-brief"], input=b"", capture_output=True).stderr.decode()
    print(sig, "->", [l for l in out.splitlines() if "Peer certificate" in l or "signature type" in l.lower()])
