"""The wire protocol, sans-I/O: the tunnel session over h2, its frame guard,
header translation and the rules both ends share. Imports no trio."""
