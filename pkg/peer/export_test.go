package peer

// HeldTask reports whether p holds task id open, which keeps storage GC
// from collecting it.
func HeldTask(p *Peer, id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tasks[id] != nil
}

// DiscardTask removes a task from storage, as GC or a failed verification does.
func DiscardTask(p *Peer, id string) { _ = p.store.Remove(id) }
