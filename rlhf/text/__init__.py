"""Text in: data files in every supported format, and chats turned into token ids."""
