"""Number formats computed by hand where no library runs them on the CPU."""
