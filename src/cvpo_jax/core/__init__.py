"""What every algorithm shares: contracts, sweep members, acting, gradient steps, replay and the two trainers."""
