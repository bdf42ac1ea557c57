package cluster

import (
	"context"
	"crypto/x509"
	"net/http"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Identity is a member as its verified certificate names it.
type Identity struct {
	Name  string   // the certificate's CN; a peer's ID
	Roles []string // the certificate's OU values
}

// Has reports whether the member carries role.
func (i Identity) Has(role string) bool { return slices.Contains(i.Roles, role) }

// Member reports whether the member may take part in the P2P network
// (announce, schedule, report) rather than only ask (a client).
func (i Identity) Member() bool { return i.Has(RolePeer) || i.Has(RoleSeed) }

func identityOf(c *x509.Certificate) Identity {
	return Identity{Name: c.Subject.CommonName, Roles: slices.Clone(c.Subject.OrganizationalUnit)}
}

// FromContext returns the verified identity of a gRPC call's client. ok is
// false on a plaintext connection, or when no certificate was verified.
func FromContext(ctx context.Context) (Identity, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return Identity{}, false
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return Identity{}, false
	}
	return identityOf(ti.State.VerifiedChains[0][0]), true
}

// tlsContext reports whether a gRPC call came over TLS at all.
func tlsContext(ctx context.Context) bool {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return false
	}
	_, ok = p.AuthInfo.(credentials.TLSInfo)
	return ok
}

// FromRequest returns the verified identity of an HTTP request's client.
func FromRequest(r *http.Request) (Identity, bool) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return Identity{}, false
	}
	return identityOf(r.TLS.VerifiedChains[0][0]), true
}

// CheckPeer authorises a call that speaks for peer peerID (as a seed when
// seed is set): over TLS the caller's certificate must be a peer or seed
// whose CN is peerID, and a seed's must carry the seed role. A plaintext
// call passes: the node runs without TLS only on loopback or when the
// operator said insecure. The error is a gRPC status.
func CheckPeer(ctx context.Context, peerID string, seed bool) error {
	if !tlsContext(ctx) {
		return nil
	}
	id, ok := FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no verified cluster certificate")
	}
	switch {
	case !id.Member():
		return status.Errorf(codes.PermissionDenied, "certificate %q has roles %v: not a peer or seed", id.Name, id.Roles)
	case peerID != id.Name:
		return status.Errorf(codes.PermissionDenied, "certificate %q may not speak for peer %q", id.Name, peerID)
	case seed && !id.Has(RoleSeed):
		return status.Errorf(codes.PermissionDenied, "certificate %q has no seed role", id.Name)
	}
	return nil
}

// UnaryServerInterceptor binds every request that names a peer (a
// "peer_id" field, or a "peer" message with "id" and "seed") to the
// caller's certificate with CheckPeer. Requests that name no peer
// (preheat, task status) are open to every member.
func UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if m, ok := req.(proto.Message); ok {
			if id, seed, named := peerNamed(m.ProtoReflect()); named {
				if err := CheckPeer(ctx, id, seed); err != nil {
					return nil, err
				}
			}
		}
		return handler(ctx, req)
	}
}

// peerNamed finds the peer a request speaks for.
func peerNamed(m protoreflect.Message) (id string, seed, ok bool) {
	fields := m.Descriptor().Fields()
	if f := fields.ByName("peer_id"); f != nil && f.Kind() == protoreflect.StringKind {
		return m.Get(f).String(), false, true
	}
	if f := fields.ByName("peer"); f != nil && f.Kind() == protoreflect.MessageKind {
		pm := m.Get(f).Message()
		pf := pm.Descriptor().Fields()
		if idf := pf.ByName("id"); idf != nil && idf.Kind() == protoreflect.StringKind {
			if sf := pf.ByName("seed"); sf != nil && sf.Kind() == protoreflect.BoolKind {
				seed = pm.Get(sf).Bool()
			}
			return pm.Get(idf).String(), seed, true
		}
	}
	return "", false, false
}

// RequireMember answers 401 to a request without a verified cluster
// certificate, except on the exact paths in open (health, metrics). It is
// for listeners with ServerTLSOptionalClient; a list of what stays open
// rather than of what is guarded, so a new path is guarded by default.
func RequireMember(h http.Handler, open ...string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, ok := FromRequest(r); !ok && !slices.Contains(open, r.URL.Path) {
			http.Error(w, "a client certificate from the cluster CA is required", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}
