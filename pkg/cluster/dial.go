package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"
)

// DialTLS returns an http.Transport DialTLSContext that dials with d,
// handshakes with cfg (a ClientTLS) and checks the server's certificate
// against the host dialled (VerifyHost).
func DialTLS(cfg *tls.Config, d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		raw, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		host := hostOf(addr)
		c := cfg.Clone()
		if c.ServerName == "" && net.ParseIP(host) == nil {
			c.ServerName = host
		}
		conn := tls.Client(raw, c)
		if err := conn.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, fmt.Errorf("TLS with %s: %w", addr, err)
		}
		if err := VerifyHost(conn.ConnectionState(), host); err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}
}

// Credentials are gRPC transport credentials over cfg (a ClientTLS) that
// also check the server's certificate against the address dialled.
func Credentials(cfg *tls.Config) credentials.TransportCredentials {
	return hostCreds{TransportCredentials: credentials.NewTLS(cfg)}
}

type hostCreds struct {
	credentials.TransportCredentials
}

func (h hostCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := h.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, err
	}
	if ti, ok := info.(credentials.TLSInfo); ok {
		if err := VerifyHost(ti.State, hostOf(authority)); err != nil {
			conn.Close()
			return nil, nil, err
		}
	}
	return conn, info, nil
}

func (h hostCreds) Clone() credentials.TransportCredentials {
	return hostCreds{TransportCredentials: h.TransportCredentials.Clone()}
}

// ServerCredentials are gRPC server credentials over c.ServerTLS.
func ServerCredentials(c *Cluster) credentials.TransportCredentials {
	return credentials.NewTLS(c.ServerTLS())
}
