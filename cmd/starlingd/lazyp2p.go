package main

import (
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/registry"
)

// p2pFetchers makes the snapshotter read layer blobs through the peer: a
// lazy pull on one node then leaves pieces that other nodes fetch from it.
// The origin side of those tasks is the registry client, with its auth,
// mirrors and retries. Each fetcher is a *peer.LazyFetcher: whoever ends
// the layer closes it (io.Closer) so that its task can be collected.
func p2pFetchers(p *peer.Peer, client *registry.Client) layer.FetcherFactory {
	return func(repo name.Repository, desc v1.Descriptor) blob.Fetcher {
		direct := &blob.RegistryFetcher{Client: client, Repo: repo, Digest: desc.Digest}
		return p.NewLazyFetcher(peer.RegistryBlobRequest(repo, desc), direct)
	}
}
