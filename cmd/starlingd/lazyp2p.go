package main

import (
	"context"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/originq"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/registry"
)

// p2pFetchers makes the snapshotter read layer blobs through the peer: a
// lazy pull on one node then leaves pieces that other nodes fetch from it.
// The origin side of those tasks is the registry client, with its auth,
// mirrors and retries; the task also carries the client's Authorization
// header, so that a seed fetching for this node may read what it may.
// Each fetcher is a *peer.LazyFetcher: whoever ends the layer closes it
// (io.Closer) so that its task can be collected. Its registry range reads
// (direct, and the task's origin) hold a slot of gate to the registry
// host at the priority of the read (pkg/blob tags demand, prefetch and
// background fetch).
func p2pFetchers(p *peer.Peer, client *registry.Client, gate *originq.Gate) layer.FetcherFactory {
	auth := &authCache{client: client, ttl: authTTL, m: map[string]authEntry{}}
	return func(repo name.Repository, desc v1.Descriptor) blob.Fetcher {
		direct := originq.Fetcher(gate, repo.RegistryStr(), &blob.RegistryFetcher{Client: client, Repo: repo, Digest: desc.Digest})
		return p.NewLazyFetcher(peer.RegistryBlobRequest(repo, desc), direct,
			peer.WithAuthorization(func(ctx context.Context) (string, error) { return auth.get(ctx, repo) }))
	}
}

// gatedFetchers reads layer blobs straight from the registry, each range
// read holding a slot of gate to the registry host at its priority.
func gatedFetchers(client *registry.Client, gate *originq.Gate) layer.FetcherFactory {
	return func(repo name.Repository, desc v1.Descriptor) blob.Fetcher {
		return originq.Fetcher(gate, repo.RegistryStr(), &blob.RegistryFetcher{Client: client, Repo: repo, Digest: desc.Digest})
	}
}

// authTTL is how long one repository's Authorization header is reused for
// the tasks of its layers: well inside the shortest token lifetime in use
// (Docker Hub's is 300s), and it saves the token round trips on every
// layer of an image.
const authTTL = time.Minute

// authCache keeps the last Authorization header per repository.
type authCache struct {
	client *registry.Client
	ttl    time.Duration

	mu sync.Mutex
	m  map[string]authEntry
}

type authEntry struct {
	header string
	at     time.Time
}

func (c *authCache) get(ctx context.Context, repo name.Repository) (string, error) {
	key := repo.Name()
	c.mu.Lock()
	e, ok := c.m[key]
	c.mu.Unlock()
	if ok && time.Since(e.at) < c.ttl {
		return e.header, nil
	}
	// Not under the lock: layers of other repositories do not wait on
	// this one's token; two layers of one repository may both ask.
	h, err := c.client.Authorization(ctx, repo)
	if err != nil {
		return "", err
	}
	c.mu.Lock()
	c.m[key] = authEntry{header: h, at: time.Now()}
	c.mu.Unlock()
	return h, nil
}
