"""The SFTP front door: SSH transport and authentication (server.py), the per-user jailed file
system that stages uploads and hands them to the intake (filesystem.py), and the few protocol
fixes stock asyncssh needs for real clients (protocol.py)."""
